"""AMC pointing game on Flickr30k Entities (AMC paper Tables 1 / 2; per-category Table 4).

For each phrase whose entity has >= 1 box: GradCAM heatmap of (image, phrase) at 256 px (16 x 16
map for /16 models; image squashed to 256 x 256 as the authors' Resize(256, 256)), bicubic-upsampled
to the ORIGINAL image size, argmax = first maximum in row-major order; hit iff the point is strictly
inside ANY of the entity's boxes (notes/amc-and-local-alignment.md §7). Accuracy = hits / phrases;
per `phrase_type` (first entity type) for Table 4.
Data:  python -m trace_jax.data.real.flickr30k_entities --manual_dir ~/datasets/flickr30k_entities
Model: the AMC-finetuned CLIP written by `python train.py --config configs/amc.py` (model dir in
  <workdir>/model). The authors' ALBEF-14M checkpoint is a different architecture (BERT fusion
  encoder) and is not convertible; a CLIP baseline is `trace-jax convert --from openai ViT-B-16.pt`.
Run:   python evaluate.py --config configs/eval_amc_flickr30k.py [--checkpoint DIR]
"""
from trace_jax.evaluation import real_config as rc


def get_config():
  return rc.base(
      'pointing_game', 'AMC (Yang et al., CVPR 2023) Tables 1, 2, 4: Flickr30k Entities',
      name='trace_flickr30k_entities', config='default', split='test', splits=('val', 'test'),
      manual_dir='~/datasets/flickr30k_entities', checkpoint='~/runs/amc/model',
      convert='python train.py --config configs/amc.py --workdir ~/runs/amc',
      method=rc.amc_gradcam(), image_size=256, metrics=('pointing_accuracy',),
      text='phrases',                # phrases with phrase_has_box (scene / no-box entities excluded)
      per_category='phrase_type')

