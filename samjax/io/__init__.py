"""Reading and writing files.

* `checkpoint`: the PyTorch <-> Orbax conversion table, Orbax save/load, metadata.
* `torchfile`: the torch-free allow-list reader of official `.pth` files.
* `pretrained`: download (verified by SHA-256), conversion and caching of the
  official weights.
* `images`: image decoding (OpenCV) with the size read from the header first.
* `files`: the one atomic-write helper (temp file, fsync, rename) and its cleanup.
* `prefetch`: the one thread prefetcher.
"""
