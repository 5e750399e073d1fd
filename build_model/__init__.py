"""`pspnet build`: mmseg PSPNet config + checkpoint -> the daemon's model directory.

One job per module:
  cli            the `build` subcommand (no heavy imports until it runs)
  export         build(): config + checkpoint -> artifacts (+ optional verify)
  artifacts      write_artifacts(): any core network -> ONNX per batch, ATC, .pt2, manifest
  onnx_export    dynamo export (opset 18) -> onnxsim -> onnx.checker, one file per batch
  torch_program  torch.export program of the core, dynamic batch
  atc            Ascend ATC scripts (run when `atc` is on PATH)
  network        config + checkpoint -> loaded mmseg network and manifest facts
  mmseg_model    config lookup, segmentor build (BN, no auxiliary head), the core module
  mmseg_shim     stand-in mmcv.ops so mmseg imports on mmcv-lite
  checkpoint     weights-only checkpoint reading, key/shape/class checks
  calibrate      non-degenerate test weights without a trained checkpoint
  verify         onnxruntime / torch program vs eager mmseg on sample photos
  inputs, samples, fmt, errors, make_samples: helpers
"""
