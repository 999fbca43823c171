"""M2IB localization on MS-CXR (M2IB paper §4.3, Table 1 "% Localization"; Table 2 confidence drop).

For each (image, phrase): the M2IB vision map (224 px, bilinear, min-max; the image through the CLIP
processor: shortest side 224, centre crop), binarised at > 0.75; IoU with the union of ALL the
phrase's boxes mapped into the same 224 x 224 frame (paper eq. 16). Also the image confidence drop /
increase of the distilled image (paper eq. 17-18, metrics.image_confidence). The paper averages 10
seeds of `num_samples` sampled pairs: each seed samples its pairs AND the bottleneck noise.
Data:  python -m trace_jax.data.real.mscxr --config v1_1_0 --manual_dir ~/datasets/ms-cxr
Model: CXR-RePaiR (a CLIP ViT-B/32 fine-tuned on MIMIC-CXR, OpenAI `clip` layout; paper §4.1):
  trace-jax convert --from openai clip_repair.pt ~/models/cxr-repair-vit-b-32
  (`openai/clip-vit-base-patch32` — trace-jax convert --from hf — for the "pretrained" comparison.)
Run:   python evaluate.py --config configs/eval_m2ib_mscxr.py [--checkpoint DIR]
Settings (notes/m2ib.md §1-2): bottleneck after vision block 9 and text block 9 (0-based; the MS-CXR
demo uses text layer 7), beta = 1 (MS-CXR demo), 10 Adam steps, lr 1, 10 noise copies (`samples`);
the official `var` has no effect (sigma = None reproduces that). Only the image map is optimised.
"""
from trace_jax.evaluation import real_config as rc


def get_config():
  return rc.base(
      'm2ib_localization', 'M2IB (Wang et al., NeurIPS 2023) Table 1, MS-CXR % Localization',
      name='trace_mscxr', config='v1_1_0', split='test', manual_dir='~/datasets/ms-cxr',
      checkpoint='~/models/cxr-repair-vit-b-32',
      convert='trace-jax convert --from openai clip_repair.pt ~/models/cxr-repair-vit-b-32',
      method=dict(name='m2ib', vision_layer=9, text_layer=9, beta=1.0, steps=10, lr=1.0, samples=10),
      image_size=224, resize='crop', metrics=('localization_iou', 'confidence_drop', 'confidence_increase'),
      num_samples=500, seeds=tuple(range(10)), binarize_threshold=0.75, percentile=False,
      batch_size=8)                  # pairs per M2IB call (vmapped)
