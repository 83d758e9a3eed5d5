"""The device stage (named apart from the build/ output folder): the static TensorRT check (check), the host's part
(stage: FP16 and INT8 graphs, the bundle, an engine built here), the candidates sent for the device's own choice
(frontier, bundle), and the files copied into every bundle (deploy, golden, engines, runtimes, device_choice,
stages). Empty, so that `edgefuse check` loads neither torch nor scipy."""
