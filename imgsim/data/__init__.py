"""Data: listing images (folders, s3://), reading and decoding bytes, URL fetching, the row schema and the built-in data set."""
