"""Predicts the 3D pose of the object in your own photos with a trained model.

    nvsm-predict --workdir runs/nemo_car --out preds photo1.jpg photo2.png
    nvsm-predict --workdir runs/nemo_car --out preds --box 120,80,560,400 photo.jpg
    nvsm-predict --workdir runs/fewshot/nvsm_car_7 --out preds --boxes boxes.csv photos/

``--workdir`` is a ``nvsm-train-nemo`` workdir or a cell of ``nvsm-fewshot``
(``W/nvsm_car_7``; the run's training data root must still exist). Images
are files or folders (JPEG / PNG, any size). Without a box an image is taken as the
object's crop; ``--box x0,y0,x1,y1`` (pixels, for every image given) or ``--boxes``
(a JSON ``{"image": [x0, y0, x1, y1]}`` or CSV ``image,x0,y0,x1,y1`` file, keyed by
file name or path) give the object's box, and the photo is cropped and rescaled
around it as the real-data preparation does.

Writes ``OUT/predictions.jsonl`` (per image: azimuth, elevation, theta in degrees,
distance, score and the second-best hypothesis), ``OUT/overlays/*.png`` (the model's
cuboid at the predicted pose, the object's x / y / z axes in red / green / blue) and
``OUT/contact_sheet.png``. See ``nvsm_jax.nemo.predict``.
"""

from __future__ import annotations

from absl import flags, logging

from . import run

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained NeMo workdir or few-shot cell.", required=True)
flags.DEFINE_string("out", "predictions", "Output folder.")
flags.DEFINE_list("box", None, "x0,y0,x1,y1: the object's box (pixels) in every image given.")
flags.DEFINE_string("boxes", None, "A JSON or CSV file of boxes per image.")
flags.DEFINE_string("solver", "config", "'config' (the workdir's), 'reference' or 'fast'.")
flags.DEFINE_integer("batch_size", None, "Images per solver call (default the config's "
                     "eval_batch_size).")


def main(argv):
    from nvsm_jax import parallel, training
    from nvsm_jax.nemo import predict
    from nvsm_jax.data import DataError

    images = argv[1:]
    if not images:
        raise DataError("no images given: nvsm-predict --workdir W --out OUT IMAGE_OR_FOLDER ...")
    if FLAGS.box and FLAGS.boxes:
        raise DataError("give --box or --boxes, not both")
    parallel.quiet_backend_probe_logs()
    logging.set_verbosity(logging.INFO)
    training.quiet_checkpoint_logs()
    boxes = FLAGS.boxes
    if FLAGS.box:
        try:
            box = [float(v) for v in FLAGS.box]
        except ValueError:
            raise predict.BoxError(f"--box {','.join(FLAGS.box)}: not 4 numbers x0,y0,x1,y1") from None
        boxes = [box] * len(predict.list_images(images))
    records = predict.predict_images(FLAGS.workdir, images, boxes, out_dir=FLAGS.out,
                                     solver=FLAGS.solver, batch_size=FLAGS.batch_size)
    for r in records:
        print(f"{r['image']}: azimuth {r['azimuth']:.1f} elevation {r['elevation']:.1f} "
              f"theta {r['theta']:.1f} distance {r['distance']:.2f} score {r['score']:.3f} "
              f"(second: azimuth {r['second']['azimuth']:.1f}, score "
              f"{r['second']['score']:.3f})")
    print(f"wrote {FLAGS.out}/predictions.jsonl, {FLAGS.out}/overlays/ and "
          f"{FLAGS.out}/contact_sheet.png")


if __name__ == "__main__":
    run(main)
