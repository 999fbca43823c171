"""AMC pointing game on Flickr30k Entities (AMC paper Table 1 / 2; per-category Table 4).

For each phrase whose entity has >= 1 box: GradCAM heatmap of (image, phrase) at 256 px (16 x 16
map for /16 models), bicubic-upsampled to the ORIGINAL image size, argmax = first maximum in
row-major order; hit iff the point is strictly inside ANY of the entity's boxes
(notes/amc-and-local-alignment.md §7). Accuracy = hits / phrases; per `phrase_type` for Table 4.
Data:  python -m trace_jax.data.real.flickr30k_entities --manual_dir ~/datasets/flickr30k_entities
Model: the AMC-finetuned CLIP written by `python train.py --config configs/amc.py` (model dir in
  <workdir>/model). The authors' ALBEF-14M checkpoint is a different architecture (BERT fusion
  encoder) and is not convertible; a CLIP baseline is `trace-jax convert --from openai ViT-B-16.pt`.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.eval = e = ml_collections.ConfigDict()
  e.task = 'pointing_game'
  e.paper = 'AMC (Yang et al., CVPR 2023) Tables 1, 2, 4: Flickr30k Entities'
  e.dataset = ml_collections.ConfigDict(dict(
      name='trace_flickr30k_entities', config='default', split='test', splits=('val', 'test'),
      manual_dir='~/datasets/flickr30k_entities', data_dir='~/tensorflow_datasets'))
  e.phrases = 'with_box'            # phrases with phrase_has_box (scene / no-box entities excluded)
  e.hit = 'strictly_inside_any'     # x0 < x < x1 and y0 < y < y1 for any box of the entity
  e.per_category = 'phrase_type'
  e.checkpoint = '~/runs/amc/model'
  e.convert = 'python train.py --config configs/amc.py --workdir ~/runs/amc'
  e.method = ml_collections.ConfigDict(dict(
      name='gradcam', layer=-1, target='similarity', grad_relu='before_product', head_mean=True,
      upsample='bicubic', normalize=False))
  e.image_size = 256
  e.batch_size = 32
  e.metrics = ('pointing_accuracy',)
  return c
