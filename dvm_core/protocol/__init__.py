"""Pure protocol code: NIP-01 events and keys, NIP-04/NIP-44 encryption (and `encryption`, which
picks the scheme), NIP-90 messages, Cashu tokens with NUT-18 requests and NIP-61 nutzaps (`ecash`),
Blossom's authorization rules and blob descriptors. No I/O and no other layer of dvm_core."""
