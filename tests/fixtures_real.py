"""Tiny fixtures in the OFFICIAL layouts and field names of the real datasets (written by the tests
into tmp_path, used as tfds manual_dir). Each writer returns what it wrote (the official values),
so the tests can check the builders' conversions against them.
"""
from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np
from PIL import Image


def _jpeg(path, h, w, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format='JPEG')


def _json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def column_major_runs(mask: np.ndarray) -> list[int]:
  """Uncompressed COCO RLE counts written independently of trace_jax (runs of 0 then 1, Fortran order)."""
  flat = mask.T.reshape(-1).astype(int).tolist()
  runs, cur, n = [], 0, 0
  for v in flat:
    if v == cur:
      n += 1
    else:
      runs.append(n)
      cur, n = v, 1
  runs.append(n)
  return runs


# ---------------------------------------------------------------------------------------------------
# COCO 2017 / COCO-Stuff

COCO_CATS = [{'supercategory': 'person', 'id': 1, 'name': 'person'},
             {'supercategory': 'animal', 'id': 18, 'name': 'dog'},
             {'supercategory': 'kitchen', 'id': 47, 'name': 'cup'}]


def write_coco(root: str, split: str = 'val2017', missing_image: bool = True) -> dict:
  """3 images listed (the third has no file when missing_image): polygons, an uncompressed crowd
  RLE, captions, and COCO-Stuff stuffthingmaps."""
  images = [dict(id=139, file_name='000000000139.jpg', height=40, width=48),
            dict(id=285, file_name='000000000285.jpg', height=32, width=30),
            dict(id=632, file_name='000000000632.jpg', height=24, width=24)]
  for k, im in enumerate(images[:2] if missing_image else images):
    _jpeg(os.path.join(root, split, im['file_name']), im['height'], im['width'], k)
  crowd = np.zeros((40, 48), bool)
  crowd[5:15, 30:44] = True
  anns = [
      # integer rectangle polygon: the COCO API fills rows y0..y1-1, cols x0..x1-1
      dict(id=1, image_id=139, category_id=1, bbox=[4, 6, 10, 20], area=200.0, iscrowd=0,
           segmentation=[[4, 6, 14, 6, 14, 26, 4, 26]]),
      # two polygons (a union), one a triangle
      dict(id=2, image_id=139, category_id=18, bbox=[20, 20, 20, 15], area=150.0, iscrowd=0,
           segmentation=[[20, 20, 30, 20, 30, 30, 20, 30], [32.5, 22.0, 39.5, 34.5, 33.0, 34.0]]),
      dict(id=3, image_id=139, category_id=1, bbox=[30, 5, 14, 10], area=140.0, iscrowd=1,
           segmentation={'counts': column_major_runs(crowd), 'size': [40, 48]}),
      dict(id=4, image_id=285, category_id=47, bbox=[2.5, 3.5, 10.0, 8.0], area=80.0, iscrowd=0,
           segmentation=[[2.5, 3.5, 12.5, 3.5, 12.5, 11.5, 2.5, 11.5]]),
      dict(id=5, image_id=632, category_id=18, bbox=[0, 0, 5, 5], area=25.0, iscrowd=0,
           segmentation=[[0, 0, 5, 0, 5, 5, 0, 5]]),
  ]
  info = {'description': 'COCO 2017 Dataset', 'version': '1.0', 'year': 2017}
  _json(os.path.join(root, 'annotations', f'instances_{split}.json'),
        {'info': info, 'licenses': [], 'images': [dict(im, license=1, coco_url='', date_captured='',
                                                      flickr_url='') for im in images],
         'annotations': anns, 'categories': COCO_CATS})
  caps = [dict(id=11, image_id=139, caption='A man and his dog sit near a brick wall.'),
          dict(id=12, image_id=139, caption='Two people in a room under the sky'),
          dict(id=13, image_id=285, caption='A cup on a table.'),
          dict(id=14, image_id=632, caption='A dog.')]
  _json(os.path.join(root, 'annotations', f'captions_{split}.json'),
        {'info': info, 'licenses': [], 'images': images, 'annotations': caps})
  maps = {}
  for im in images[:2]:
    lab = np.full((im['height'], im['width']), 255, np.uint8)
    lab[: im['height'] // 2] = 156      # sky-other (id 157)
    lab[im['height'] // 2:, : im['width'] // 2] = 0   # person (id 1)
    lab[-4:, -4:] = 170                 # wall-brick (id 171)
    p = os.path.join(root, 'stuffthingmaps_trainval2017', split, im['file_name'].replace('.jpg', '.png'))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    Image.fromarray(lab, mode='L').save(p)
    maps[im['id']] = lab
  return dict(images=images, annotations=anns, captions=caps, crowd_mask=crowd, maps=maps)


# ---------------------------------------------------------------------------------------------------
# RefCOCO (REFER toolkit data/ folder)

def write_refcoco(root: str, dataset: str = 'refcoco', split_by: str = 'unc') -> dict:
  images = [dict(id=9, file_name='COCO_train2014_000000000009.jpg', height=30, width=40),
            dict(id=25, file_name='COCO_train2014_000000000025.jpg', height=36, width=28),
            dict(id=30, file_name='COCO_train2014_000000000030.jpg', height=20, width=20)]
  for k, im in enumerate(images[:2]):  # image 30 is missing on disk
    _jpeg(os.path.join(root, 'images', 'mscoco', 'images', 'train2014', im['file_name']),
          im['height'], im['width'], 10 + k)
  anns = [dict(id=100, image_id=9, category_id=1, bbox=[2, 3, 10, 12], area=120.0, iscrowd=0,
               segmentation=[[2, 3, 12, 3, 12, 15, 2, 15]]),
          dict(id=101, image_id=9, category_id=1, bbox=[20, 4, 15, 20], area=300.0, iscrowd=0,
               segmentation=[[20, 4, 35, 4, 35, 24, 20, 24]]),
          dict(id=102, image_id=9, category_id=18, bbox=[5, 20, 6, 6], area=36.0, iscrowd=0,
               segmentation=[[5, 20, 11, 20, 11, 26, 5, 26]]),
          dict(id=200, image_id=25, category_id=47, bbox=[1.5, 2.5, 20.0, 30.0], area=600.0,
               iscrowd=0, segmentation=[[1.5, 2.5, 21.5, 2.5, 21.5, 32.5, 1.5, 32.5]]),
          dict(id=300, image_id=30, category_id=1, bbox=[0, 0, 10, 10], area=100.0, iscrowd=0,
               segmentation=[[0, 0, 10, 0, 10, 10, 0, 10]])]
  _json(os.path.join(root, dataset, 'instances.json'),
        {'info': {}, 'licenses': [], 'images': images, 'annotations': anns, 'categories': COCO_CATS})

  def ref(ref_id, ann_id, image_id, split, sents, cat):
    return {'sent_ids': [s[0] for s in sents], 'file_name': f'COCO_train2014_{image_id:012d}_{ann_id}.jpg',
            'ann_id': ann_id, 'ref_id': ref_id, 'image_id': image_id, 'split': split,
            'sentences': [{'tokens': s[1].lower().split(), 'raw': s[1], 'sent_id': s[0],
                           'sent': s[1].lower()} for s in sents], 'category_id': cat}
  refs = [ref(0, 100, 9, 'testA', [(0, 'Man on the LEFT'), (1, 'left guy')], 1),
          ref(1, 101, 9, 'testA', [(2, 'right man')], 1),
          ref(2, 200, 25, 'testB', [(3, 'the cup'), (4, 'white cup')], 47),
          ref(3, 300, 30, 'testB', [(5, 'a person')], 1)]
  with open(os.path.join(root, dataset, f'refs({split_by}).p'), 'wb') as f:
    pickle.dump(refs, f, protocol=2)
  return dict(images=images, annotations=anns, refs=refs)


# ---------------------------------------------------------------------------------------------------
# Flickr30k Entities

FLICKR_SENTENCES = {
    '1000092795': [
        '[/EN#1/people Two young guys] with [/EN#2/bodyparts shaggy hair] look at '
        '[/EN#3/bodyparts their hands] while hanging out in [/EN#4/scene the yard] .',
        '[/EN#1/people Two friends] enjoy [/EN#5/notvisual time] spent together .'],
    '10002456': ['[/EN#7/people/other A man] in [/EN#8/clothing an orange hat] stares at '
                 '[/EN#9/other something] .'],
    '1000268201': ['[/EN#12/people A child] in [/EN#13/clothing a pink dress] .'],
}
FLICKR_BOXES = {  # raw XML values (1-based inclusive)
    '1000092795': {'1': [[3, 5, 20, 30], [22, 4, 40, 31]], '2': [[5, 6, 12, 10]],
                   '3': [[10, 20, 18, 26], [25, 20, 30, 27]]},
    '10002456': {'7': [[1, 1, 24, 30]], '8': [[5, 2, 15, 8]]},
    '1000268201': {'12': [[2, 2, 10, 10]], '13': [[3, 5, 9, 10]]},
}
FLICKR_NOBOX = {'1000092795': {'4': 'scene', '5': 'nobndbox'}, '10002456': {'9': 'nobndbox'}}
FLICKR_SIZES = {'1000092795': (34, 44), '10002456': (32, 28), '1000268201': (12, 12)}


def write_flickr30k_entities(root: str) -> dict:
  for k, (iid, sents) in enumerate(FLICKR_SENTENCES.items()):
    h, w = FLICKR_SIZES[iid]
    if iid != '1000268201':  # its image is missing
      _jpeg(os.path.join(root, 'flickr30k-images', f'{iid}.jpg'), h, w, 20 + k)
    os.makedirs(os.path.join(root, 'Sentences'), exist_ok=True)
    with open(os.path.join(root, 'Sentences', f'{iid}.txt'), 'w') as f:
      f.write('\n'.join(sents) + '\n')
    objs = []
    for eid, boxes in FLICKR_BOXES[iid].items():
      for b in boxes:
        objs.append(f'<object><name>{eid}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>'
                    f'<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>')
    for eid, what in FLICKR_NOBOX.get(iid, {}).items():
      objs.append(f'<object><name>{eid}</name><nobndbox>{int(what == "nobndbox")}</nobndbox>'
                  f'<scene>{int(what == "scene")}</scene></object>')
    os.makedirs(os.path.join(root, 'Annotations'), exist_ok=True)
    with open(os.path.join(root, 'Annotations', f'{iid}.xml'), 'w') as f:
      f.write(f'<annotation><filename>{iid}.jpg</filename><size><width>{w}</width><height>{h}'
              f'</height><depth>3</depth></size>{"".join(objs)}</annotation>')
  for split, ids in (('train', ['10002456']), ('val', ['1000092795']), ('test', ['1000268201', '10002456'])):
    with open(os.path.join(root, f'{split}.txt'), 'w') as f:
      f.write('\n'.join(ids) + '\n')
  return dict(sentences=FLICKR_SENTENCES, boxes=FLICKR_BOXES)


# ---------------------------------------------------------------------------------------------------
# Visual Genome

def write_visual_genome(root: str) -> dict:
  imgs = [dict(image_id=1, width=100, height=80, url='https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg',
               coco_id=None, flickr_id=None),
          dict(image_id=2, width=60, height=60, url='https://cs.stanford.edu/people/rak248/VG_100K/2.jpg',
               coco_id=None, flickr_id=None),
          dict(image_id=3, width=50, height=50, url='https://cs.stanford.edu/people/rak248/VG_100K/3.jpg',
               coco_id=None, flickr_id=None)]
  _jpeg(os.path.join(root, 'VG_100K_2', '1.jpg'), 80, 100, 30)
  _jpeg(os.path.join(root, 'VG_100K', '2.jpg'), 60, 60, 31)   # image 3 is missing
  objects = [
      {'image_id': 1, 'image_url': imgs[0]['url'], 'objects': [
          dict(object_id=10, x=0, y=0, w=30, h=30, names=['dog'], synsets=['dog.n.01'], merged_object_ids=[]),
          dict(object_id=11, x=60, y=45, w=40, h=35, names=['dog'], synsets=['dog.n.01'], merged_object_ids=[]),
          dict(object_id=12, x=40, y=10, w=5, h=5, names=['ball'], synsets=[], merged_object_ids=[]),
          dict(object_id=13, x=35, y=20, w=30, h=40, names=['apple'], synsets=[], merged_object_ids=[])]},
      {'image_id': 2, 'objects': [dict(object_id=20, x=10, y=10, w=40, h=40, names=['table'], synsets=[])]},
      {'image_id': 3, 'objects': [dict(object_id=30, x=0, y=0, w=50, h=50, names=['wall'], synsets=[])]}]
  attributes = [
      {'image_id': 1, 'attributes': [
          dict(object_id=10, x=0, y=0, w=30, h=30, names=['dog'], attributes=['brown', 'small']),
          dict(object_id=11, x=60, y=45, w=40, h=35, names=['dog'], attributes=['white ']),
          dict(object_id=12, x=40, y=10, w=5, h=5, names=['ball'], attributes=['red']),
          dict(object_id=13, x=35, y=20, w=30, h=40, names=['apple'])]},
      {'image_id': 2, 'attributes': [dict(object_id=20, x=10, y=10, w=40, h=40, names=['table'],
                                          attributes=['wooden'])]},
      {'image_id': 3, 'attributes': []}]
  regions = [
      {'id': 1, 'regions': [dict(region_id=100, image_id=1, phrase='two dogs playing on grass', x=0, y=0,
                                 width=100, height=80),
                            dict(region_id=101, image_id=1, phrase='a tiny ball', x=40, y=10, width=6,
                                 height=6)]},
      {'id': 2, 'regions': [dict(region_id=200, image_id=2, phrase='a wooden table', x=5, y=5, width=50,
                                 height=50)]},
      {'id': 3, 'regions': [dict(region_id=300, image_id=3, phrase='a wall', x=0, y=0, width=50,
                                 height=50)]}]
  _json(os.path.join(root, 'image_data.json'), imgs)
  _json(os.path.join(root, 'objects.json'), objects)
  _json(os.path.join(root, 'attributes.json'), attributes)
  _json(os.path.join(root, 'region_descriptions.json'), regions)
  return dict(images=imgs, objects=objects, attributes=attributes, regions=regions)


# ---------------------------------------------------------------------------------------------------
# PASCAL VOC 2012 / PASCAL-Context

def voc_palette() -> list[int]:
  """The standard VOC colour map (bit-interleaved), 256 x RGB."""
  pal = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal += [r, g, b]
  return pal


def write_voc(root: str) -> dict:
  base = os.path.join(root, 'VOCdevkit', 'VOC2012')
  ids = {'train': ['2007_000032', '2007_000039'], 'val': ['2007_000033', '2007_000042']}
  labels = {}
  for k, iid in enumerate(ids['train'] + ids['val']):
    h, w = 20 + 2 * k, 24
    if iid != '2007_000042':  # missing image
      _jpeg(os.path.join(base, 'JPEGImages', f'{iid}.jpg'), h, w, 40 + k)
    lab = np.zeros((h, w), np.uint8)
    lab[2:10, 3:12] = 15 if k % 2 == 0 else 12   # person / dog
    lab[12:, 14:] = 1 + k                        # aeroplane, bicycle, ...
    lab[10, :] = 255                             # void border
    im = Image.fromarray(lab, mode='P')
    im.putpalette(voc_palette())
    os.makedirs(os.path.join(base, 'SegmentationClass'), exist_ok=True)
    im.save(os.path.join(base, 'SegmentationClass', f'{iid}.png'))
    labels[iid] = lab
  os.makedirs(os.path.join(base, 'ImageSets', 'Segmentation'), exist_ok=True)
  for split, lst in ids.items():
    with open(os.path.join(base, 'ImageSets', 'Segmentation', f'{split}.txt'), 'w') as f:
      f.write('\n'.join(lst) + '\n')
  return dict(ids=ids, labels=labels)


CONTEXT_LABELS = ['accordion', 'aeroplane', 'air conditioner', 'antenna', 'artillery', 'ashtray',
                  'atrium', 'baby carriage', 'bag', 'ball', 'balloon', 'bamboo weaving', 'barrel',
                  'baseball bat', 'basket', 'basketball backboard', 'bathtub', 'bed', 'bedclothes',
                  'beer', 'bell', 'bench', 'bicycle', 'binoculars', 'bird']


def write_pascal_context(root: str) -> dict:
  import scipy.io
  base = os.path.join(root, 'VOCdevkit', 'VOC2010')
  ctx = os.path.join(root, 'pascal_context')
  os.makedirs(os.path.join(ctx, 'trainval'), exist_ok=True)
  with open(os.path.join(ctx, 'labels.txt'), 'w') as f:
    f.write('\n'.join(f'{i + 1}: {n}' for i, n in enumerate(CONTEXT_LABELS)) + '\n')
  sub = ['aeroplane', 'bicycle', 'bird', 'bed']   # a "59"-class list with 4 entries
  with open(os.path.join(ctx, '59_labels.txt'), 'w') as f:
    f.write('\n'.join(f'{i + 1}: {n}' for i, n in enumerate(sub)) + '\n')
  ids = {'train': ['2008_000002'], 'val': ['2008_000003']}
  maps = {}
  for k, iid in enumerate(ids['train'] + ids['val']):
    h, w = 16, 20
    _jpeg(os.path.join(base, 'JPEGImages', f'{iid}.jpg'), h, w, 50 + k)
    lab = np.zeros((h, w), np.uint16)
    lab[:8] = 2          # aeroplane
    lab[8:, :10] = 25    # bird
    lab[8:, 10:] = 1 + k  # accordion (not in the subset) / aeroplane
    scipy.io.savemat(os.path.join(ctx, 'trainval', f'{iid}.mat'), {'LabelMap': lab})
    maps[iid] = lab
  os.makedirs(os.path.join(base, 'ImageSets', 'Main'), exist_ok=True)
  for split, lst in ids.items():
    with open(os.path.join(base, 'ImageSets', 'Main', f'{split}.txt'), 'w') as f:
      f.write('\n'.join(lst) + '\n')
  return dict(ids=ids, maps=maps, labels=CONTEXT_LABELS, subset=sub)


# ---------------------------------------------------------------------------------------------------
# MS-CXR

MSCXR_HEADER = ['dicom_id', 'category_name', 'label_text', 'path', 'x', 'y', 'w', 'h', 'image_width',
                'image_height', 'split']


def write_mscxr(root: str, name: str = 'MS_CXR_Local_Alignment_v1.1.0.csv') -> dict:
  p1 = 'files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg'
  p2 = 'files/p11/p11000011/s51029426/174413ec-4ec4c1f7.jpg'
  p3 = 'files/p12/p12000022/s52000000/missing-0000.jpg'
  _jpeg(os.path.join(root, p1), 40, 50, 60)    # same size as in the CSV
  _jpeg(os.path.join(root, p2), 30, 30, 61)    # CSV says 60 x 60: boxes are rescaled by 0.5
  rows = [
      ['02aa804e-bde0afdd', 'Pneumonia', 'right lower lobe opacity', p1, 5, 6, 10, 12, 50, 40, 'test'],
      ['02aa804e-bde0afdd', 'Pneumonia', 'right lower lobe opacity', p1, 30, 8, 12, 14, 50, 40, 'test'],
      ['02aa804e-bde0afdd', 'Cardiomegaly', 'enlarged heart', p1, 15, 15, 20, 20, 50, 40, 'test'],
      ['174413ec-4ec4c1f7', 'Pneumothorax', 'small left apical pneumothorax', p2, 10, 20, 20, 8, 60, 60,
       'train'],
      ['missing-0000', 'Edema', 'mild edema', p3, 1, 1, 5, 5, 20, 20, 'test'],
  ]
  with open(os.path.join(root, name), 'w', newline='') as f:
    wr = csv.writer(f)
    wr.writerow(MSCXR_HEADER)
    wr.writerows(rows)
  return dict(rows=rows)
