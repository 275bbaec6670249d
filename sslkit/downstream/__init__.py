"""Downstream segmentation: fine-tune / frozen-encoder adaptation, sliding-window evaluation, metrics, predict.

Entry points (each wired to one CLI sub-command):
  sslkit.downstream.config.load_downstream_config(path, overrides) -> DownstreamConfig
  sslkit.downstream.train.finetune(cfg, run_dir, encoder_path=None, resume=None) -> dict
  sslkit.downstream.evaluate.evaluate(run_dir, ckpt=None, out_dir=None, data_root=None, device="auto") -> dict
  sslkit.downstream.evaluate.compare(run_dirs, out) -> Path
  sslkit.downstream.predict.predict(ckpt, input_path, output_dir, device="auto") -> list[Path]
"""
