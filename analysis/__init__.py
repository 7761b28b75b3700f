"""analysis — analyzers built on rmae: attention, attribution, instance-awareness metrics,
probes, interactive segmentation and MAE vs R-MAE reports. Imports rmae; rmae never imports it."""
