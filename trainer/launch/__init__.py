"""Who runs the worker loop: the :class:`~trainer.launch.runtime.Runtime` interface and its two
launchers, Ray Train (:mod:`~trainer.launch.driver`, :mod:`~trainer.launch.ray_runtime`,
:mod:`~trainer.launch.rendezvous`) and this process (:mod:`~trainer.launch.local`); the
progress bars (:mod:`~trainer.launch.progress`)."""
