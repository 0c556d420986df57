"""Writing a dataset as webdataset shards (:mod:`~trainer.shards.make`, with the tar members
of :mod:`~trainer.shards.tar_writer`) and indexing shards someone else wrote
(:mod:`~trainer.shards.index`). Reading them is :mod:`trainer.data`."""
