"""Reading packs for training: the manifest and indexed shards (`reader`), one decoded and augmented
sample (`samples`, `detection` for boxes; `device_decode` for data.decode=device) and the DataLoader over a
batch plan (`loader`)."""
