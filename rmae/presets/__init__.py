"""Training presets shipped with the package (``rmae pretrain --config demo``)."""
