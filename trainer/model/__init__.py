"""The encoders (:mod:`~trainer.model.encoders`, torch and torchvision only) and an encoder
as files (:mod:`~trainer.model.export`: ``encoder.pt`` + ``encoder.json``, and
``encode_images``)."""
