"""Data: preprocess data sets into WebDataset shards (`prep`), stream them into training and eval (`shards`).

prep.py        prepare(kind, source, out_url, ShardFormat(...)): source layout -> shards + manifest (Ray tasks)
sources/       one module per source layout (ImageNet x3, CIFAR, Tiny-ImageNet, digits): what to write
encode.py      source image -> stored RGB JPEG/PNG at the prepared size
manifest.py    {split}-manifest.parquet and classes.json
shards.py      resolve_shards, make_train_loader, make_eval_loader, iter_shard_samples (the public loader API)
streams.py     the train (resampled, resumable) and eval (exactly once) streams: webdataset pipelines
tar_reader.py  our tar-member stage: shard -> raw samples, checked against the manifest's sha256, bad
               samples skipped/counted/logged (the error rules); tar_stream.py the tar parser
transforms.py  decode (with a pixel cap) + augmentation with PIL, no std division
errors.py      DataError; all I/O goes through lipnext_scale.storage with error=DataError
"""
