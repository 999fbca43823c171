"""Builders of the real-dataset evaluation configs (configs/eval_*.py; run by evaluate.py, which
dispatches on `config.eval.task` to trace_jax.evaluation.real.run, the reader of these fields).

Every config has `config.eval` with:
  task        one of trace_jax.evaluation.real.TASKS
  paper       the table / column it reproduces (printed with the results)
  dataset     {name, config, split, splits (the other official splits), manual_dir, data_dir, build}:
              the tfds builder (trace_jax/data/real) read with `as_data_source(split)`; built from
              manual_dir first when data_dir has no prepared copy and `build` is True
  checkpoint  the converted model dir (`trace-jax convert ...`, or train.py's <workdir>/model);
              --checkpoint overrides it. `convert` says how to make it.
  method      the method's settings (per task, see real.py)
  image_size  model input side (images are squashed / cropped to it, `resize`)
  resize      'squash' (LeGrad / MaskInversion / AMC: Resize((S, S))) or 'crop' (CLIP processor)
  pos_interp  position-embedding resampling when image_size differs from the model's
  num_examples  None = the whole split; an int = the first n examples (smoke runs)
  metrics     what is reported

Each configs/eval_*.py is a `get_config()` that calls one builder here (big_vision's configs/common.py
pattern): the schema lives beside its reader, the files hold only what differs per experiment.
"""
import ml_collections

MODEL_OPENAI_B16 = '~/models/openai-vit-b-16'
CONVERT_OPENAI_B16 = 'trace-jax convert --from openai ViT-B-16.pt ~/models/openai-vit-b-16'


def base(task, paper, *, name, config, split, manual_dir, splits=(), checkpoint, convert, method,
         image_size, metrics, resize='squash', pos_interp='antialias', **extra):
  """An eval config: `config.eval` with the common fields above plus `extra` (task-specific)."""
  c = ml_collections.ConfigDict()
  c.eval = e = ml_collections.ConfigDict()
  e.task = task
  e.paper = paper
  e.dataset = ml_collections.ConfigDict(dict(
      name=name, config=config, split=split, splits=tuple(splits), manual_dir=manual_dir,
      data_dir='~/tensorflow_datasets', build=True))
  e.checkpoint = checkpoint
  e.convert = convert
  e.method = ml_collections.ConfigDict(method)
  e.image_size = image_size
  e.resize = resize
  e.pos_interp = pos_interp
  e.num_examples = ml_collections.config_dict.placeholder(int)
  e.metrics = tuple(metrics)
  for k, v in extra.items():
    e[k] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v
  return c


def maskinversion_method(alpha):
  """MaskInversion settings (notes/legrad-maskinversion.md §MaskInversion 8): AdamW, 10 iterations,
  LeGrad explainability (last block), lr 0.5 (upstream README / examples; the code default is 0.1
  and the paper states none), weight decay 0; `mode` 'auto' | 'exact' | 'decomposed' gives the same
  LETs (paper §3.3 gradient decomposition = 'decomposed')."""
  return dict(name='maskinversion', explainability='legrad', iterations=10, optimizer='adamw', lr=0.5,
              weight_decay=0.0, alpha=float(alpha), mode='auto')


def amc_gradcam():
  """AMC's "itc" GradCAM (notes/amc-and-local-alignment.md §2): [CLS] row of block `layer`'s
  attention probabilities times the gradient of the image-text cosine, the gradient clamped at 0
  BEFORE the product, mean over heads. The raw map (no normalisation) is what the pointing game
  upsamples (bicubic, to the original image) and argmaxes (§7)."""
  return dict(name='gradcam', layer=-1, relu_grad=True, relu=True)


def maskinversion_class_retrieval(paper_column, *, name, config, split, manual_dir, query,
                                  class_names='metadata'):
  """MaskInversion Table 2 (class retrieval): one LET per query mask, matched against the class
  prompts; Acc@1/5/10. alpha = 0 (no regularisation for class retrieval). 448 px, squashed (the
  authors' LePreprocess), masks at the original photo size (notes: "Masks are never resized")."""
  return base(
      'class_retrieval', f'MaskInversion (Bousselham et al., 2025) Table 2, {paper_column}',
      name=name, config=config, split=split, manual_dir=manual_dir, checkpoint=MODEL_OPENAI_B16,
      convert=CONVERT_OPENAI_B16, method=maskinversion_method(0.0), image_size=448,
      metrics=('acc@1', 'acc@5', 'acc@10'), query=query, class_names=class_names,
      prompt_templates=('a photo of a {}.',),
      # comma-separated visual-prompt baselines of Table 2 (retrieval.METHODS[1:]) on the same queries
      baselines='')


def maskinversion_referring_retrieval(dataset_config, paper_column):
  """MaskInversion Table 1 (referring-expression retrieval, RefCOCO / RefCOCO+ UNC splits): one LET
  per COCO instance mask of the image (ALL its instances are candidates); each expression picks the
  mask whose LET has the highest cosine with its text embedding. alpha = 5 (paper §4.1), 448 px."""
  return base(
      'referring_retrieval', f'MaskInversion (Bousselham et al., 2025) Table 1, {paper_column}',
      name='trace_refcoco', config=dataset_config, split='val', splits=('val', 'testA', 'testB'),
      manual_dir='~/datasets/refer', checkpoint=MODEL_OPENAI_B16, convert=CONVERT_OPENAI_B16,
      method=maskinversion_method(5.0), image_size=448,
      metrics=('acc@1', 'acc@5', 'acc@10', 'miou', 'oiou'),
      candidates='all_image_masks',  # every COCO instance of the image (feature 'masks')
      text='sentences',              # REFER `sent` (lower-cased); 'sentences_raw' for the raw text
      baselines='')
