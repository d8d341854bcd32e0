"""Seeded phantom chest radiographs with true anatomy and lesion masks, written in the real datasets' layouts.

Drawing
-------
:func:`draw_frontal` draws one frontal (PA/AP) radiograph: body and soft tissue, two lungs with vessel texture,
the heart on the image's right (the patient's left), mediastinum with trachea and aortic knob, spine, posterior
and (fainter) anterior ribs, clavicles, humeral heads, diaphragm domes, gastric bubble and noise. It returns the
image (float32 ``(H, W)`` in ``[0, 1]``, bright = attenuating, as a radiograph), the anatomy masks in
:data:`~bundle.constants.SCR_STRUCTURES` order (SCR convention: "left" = the patient's left = the image's right;
the lung masks exclude the part behind the heart) and one lesion mask per CheXpert observation
(:data:`~bundle.constants.OBSERVATIONS` order; channel 0, "No Finding", is always empty). The visual signature of
each observation (:data:`SIGNATURES`) is drawn where its mask is. :func:`draw_lateral` draws a lateral view
(no masks). Everything is vectorised numpy/scipy in a normalised coordinate frame (``x``, ``y`` in ``[-1, 1]``)
that is scaled, shifted and rotated per image, so any image size works (tests use 64 px).

Anatomy is sampled per patient (:func:`sample_anatomy`), pose, exposure and noise per image. Each lesion draws
its parameters from its own child generator, so adding a finding never changes the rest of the picture.

Datasets
--------
:func:`generate_phantom_datasets` writes, under one root folder (``docs/DEVELOPMENT.md`` has the layouts):

- ``CheXpert-v1.0-small/{train,valid}.csv`` + JPEG images (patients with several studies, frontal and lateral
  views, labels ``1.0``/``0.0``/``-1.0``/empty), and the true lesion bit masks (uint16 PNG, bit ``k`` =
  ``OBSERVATIONS[k]``) under ``CheXpert-v1.0-small-lesions/`` (the image path with ``.png`` for ``.jpg``);
- ``JSRT/images/<case>.png`` + ``SCR/masks/<structure>/<case>.gif`` (``JPCLN*`` cases hold a nodule);
- ``QaTa-COV19/{Train Set,Test Set}/{Images/<name>.png, Ground-truths/mask_<name>.png}`` (COVID-19-like
  peripheral ground-glass opacities).

Label semantics of the phantom's ``train.csv``: a true finding is ``1.0`` or, at ``uncertain_rate``, ``-1.0``; an
absent one is ``0.0``, empty (not mentioned) at ``blank_rate`` or ``-1.0`` at ``false_uncertain_rate``. "No
Finding" is ``1.0`` when no observation other than Support Devices is ``1.0`` or ``-1.0``, else empty.
``valid.csv`` holds the true labels as ``0.0``/``1.0`` ("No Finding" ``1.0``/``0.0``). So a lesion mask is non-empty
exactly for the true findings: always for ``1.0``, never for ``0.0`` or empty, either way for ``-1.0``.

Determinism and resume: each image is drawn from its own generator, seeded by ``(seed, dataset, purpose,
patient, study, view)`` through :class:`numpy.random.SeedSequence`, so the bytes of every file depend neither on
the number of worker processes nor on the order of work. Every file is written atomically; the CSV files are
written last. A re-run skips the images whose files exist and decode at the right size, removes stray temporary
files, and finishes the job with the same bytes as an uninterrupted run. ``phantom.json`` records the
parameters: a re-run with other parameters raises unless ``overwrite=True`` (which deletes and regenerates the
generator's folders; folders not written by the generator are never deleted).
"""

from .drawing import DEFAULT_PREVALENCE, SIGNATURES, Anatomy, Phantom, draw_frontal, draw_lateral, phantom_rng, sample_anatomy
from .signatures import signature_contrast
from .layouts import CHEXPERT_DIR, JSRT_DIR, LESIONS_DIR, MANIFEST, QATA_DIR, SCR_DIR, lesion_mask_path
from .writer import format_summary, generate_phantom_datasets

__all__ = [
    "SIGNATURES", "DEFAULT_PREVALENCE", "Anatomy", "Phantom", "sample_anatomy", "draw_frontal", "draw_lateral",
    "phantom_rng", "lesion_mask_path", "generate_phantom_datasets", "format_summary", "CHEXPERT_DIR",
    "LESIONS_DIR", "JSRT_DIR", "SCR_DIR", "QATA_DIR", "MANIFEST", "signature_contrast",
]
