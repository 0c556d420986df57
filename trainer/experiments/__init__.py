"""The paper's experiments beyond the main run: semi-supervised fine-tuning
(:mod:`~trainer.experiments.finetune`, :mod:`~trainer.experiments.finetune_loop`), the
studies as Ray Tune grids (:mod:`~trainer.experiments.study`,
:mod:`~trainer.experiments.study_report`) and the parametric baseline
(:mod:`~trainer.experiments.parametric`)."""
