"""I/O: relay connections and the pool (`relay`), safe downloads with SSRF guards (`fetch`), the
Blossom client (`blossom`) and the authenticated encryption of blobs (`blobcrypt`). Imports only
the protocol layer."""
