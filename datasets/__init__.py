"""Dataset tools, run from the repository root.

- ``python -m datasets.generate NAME ROOT`` writes ``ROOT/meta.json`` for one of the
  14 evaluation sets (mvtec visa mpdd btad sdd dtd dagm headct brainmri br35h isic
  tn3k cvc-colondb cvc-clinicdb) or a ``custom`` folder, from the archive as it
  unpacks; ``datasets/README.md`` lists, per dataset, the archive, where it comes
  from, the trees accepted and the command.
- ``python -m datasets.synthetic ROOT`` makes the small built-in demo dataset
  (procedural textures with painted defects and masks, custom layout).

``crane.data.CraneDataset`` reads the resulting ``meta.json``.
"""
