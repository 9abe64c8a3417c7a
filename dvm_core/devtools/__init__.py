"""Development tools: `dvm demo`, a relay, a mint and a blob server on loopback (`localnet`),
`dvm doctor`, and the embedded Blossom blob server (`blobserver`, also `dvm blobs serve`)."""
