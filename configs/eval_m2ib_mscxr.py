"""M2IB localization on MS-CXR (M2IB paper §4.3, Table 1 "% Localization").

For each (image, phrase): M2IB vision attribution, upsampled to the image; binarised at the 75 %
threshold; IoU with the union of ALL the phrase's boxes (paper eq. 16). Mean over samples; the paper
averages 10 seeds of sampled pairs.
Data:  python -m trace_jax.data.real.mscxr --config v1_1_0 --manual_dir ~/datasets/ms-cxr
Model: CXR-RePaiR (a CLIP ViT-B/32 fine-tuned on MIMIC-CXR, OpenAI `clip` layout; paper §4.1):
  trace-jax convert --from openai clip_repair.pt ~/models/cxr-repair-vit-b-32
  (`openai/clip-vit-base-patch32` — trace-jax convert --from hf — for the "pretrained" comparison.)
Settings (notes/m2ib.md §1-2): bottleneck after vision block 9 and text block 9 (0-based; the MS-CXR
demo uses text layer 7), beta = 1 (MS-CXR demo), 10 Adam steps, lr 1, batch of 10 copies; var has no
effect in the official code.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.eval = e = ml_collections.ConfigDict()
  e.task = 'localization'
  e.paper = 'M2IB (Wang et al., NeurIPS 2023) Table 1, MS-CXR % Localization'
  e.dataset = ml_collections.ConfigDict(dict(
      name='trace_mscxr', config='v1_1_0', split='test', manual_dir='~/datasets/ms-cxr',
      data_dir='~/tensorflow_datasets'))
  e.num_samples = 500
  e.seeds = tuple(range(10))
  e.checkpoint = '~/models/cxr-repair-vit-b-32'
  e.convert = 'trace-jax convert --from openai clip_repair.pt ~/models/cxr-repair-vit-b-32'
  e.method = ml_collections.ConfigDict(dict(
      name='m2ib', vision_layer=9, text_layer=9, beta=1.0, var=1.0, steps=10, lr=1.0, batch=10))
  e.binarize_threshold = 0.75
  e.image_size = 224
  e.metrics = ('localization_iou',)
  return c
