"""Packing datasets into WebDataset tar shards with a manifest.

  pipeline     the pack of any format (`pack`: verify, leak check, write, commit), what a format supplies
               (`PackFormat`), and its pieces: parallel map, read-ahead, checked reads, job identity
  writer       shards (a writer thread each) and the manifest, staged and published whole, resumable
  leakage      near-duplicate images across splits (perceptual hashes)
  vocab        caption keywords -> attributes
  coco, cocottributes, dior, imagefolder   one module per source format
  inspect      `attrdist inspect`: a pack's summary and contact sheet
"""
