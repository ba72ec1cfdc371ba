"""Command for patient-grouped k-fold cross-validation."""

from __future__ import annotations

import click

from covidtl.cli.options import AUTO, AUTO_INT, INIT, INIT_HELP, MODEL_HELP, command_line, config_from, recipe_from
from covidtl.cli.train import _rate


@click.command("cv")
@click.option("--model", default=AUTO, show_default=True, help=MODEL_HELP)
@click.option("--init", type=INIT, default=AUTO, show_default=True, help=INIT_HELP)
@click.option("--dataset", required=True, help="A dataset of params.yaml (data.datasets).")
@click.option("--folds", type=AUTO_INT, default=None, help="Number of folds; auto = cv.folds.")
@click.option("--epochs", type=AUTO_INT, default=None, help="Cap on epochs per fold; auto = train.max_epochs.")
@click.option("--lr", default=None, help="Learning rate (Adam, or AdamW when train.weight_decay > 0); auto = train.learning_rates.<model>.")
@click.option("--out", default=None, help="Results go to OUT/<dataset>/<cell>/ (default cv.out).")
@click.option("--pretrain", is_flag=True,
              help="Pretrain (SimCLR, params pretrain) inside each fold on its training rows, then train "
              "from that file (--init finetune or finetune:pretrained: fine-tuned; otherwise as a weights file).")
@click.option("--prepare/--no-prepare", default=True, show_default=True,
              help="Make a missing manifest first (synth, ingest), as `dvc repro ingest@DATASET`.")
@click.pass_context
def cv(ctx, model, init, dataset, folds, epochs, lr, out, pretrain, prepare) -> None:
    """Cross-validate MODEL from INIT on DATASET: folds over patient groups, stratified by class.

    Every group is tested once by a model trained without it; prints the mean, spread and
    interval across folds and the pooled out-of-fold figures."""
    model, init = recipe_from(ctx, model, init)
    cfg = config_from(ctx, **{"cv.folds": folds, "train.max_epochs": epochs})
    # here, not above: keeps the CLI's start-up free of them; TensorFlow loads after the cheap checks
    from covidtl.cv import cross_validate
    from covidtl.scores import with_interval

    if prepare:
        from covidtl.data.prepare import ensure_split  # here, not above: keeps the CLI's start-up free of pandas

        for name in {dataset, *(cfg.pretrain.datasets if pretrain else [])}:
            ensure_split(cfg, name)
    result = cross_validate(cfg, model, init, dataset, out_root=out, lr=_rate(lr), pretrain=pretrain,
                            command=command_line(ctx))
    s = result.summary
    for name in ("roc_auc", "accuracy", "op_accuracy", "op_balanced_accuracy"):
        a = s["across_folds"][name]
        click.echo(f"{name}: mean {a['mean']:.3f} (sd {a['sd']:.3f}, {s['confidence']:.0%} CI "
                   f"{a['ci_low']:.3f}-{a['ci_high']:.3f}, folds {a['min']:.3f}-{a['max']:.3f})")
    p = s["pooled"]
    click.echo(f"pooled out-of-fold ({s['images']} images, {s['groups']} groups): AUC {p['pooled_roc_auc']:.3f} "
               f"[{p.get('pooled_roc_auc_ci_low', float('nan')):.3f}, {p.get('pooled_roc_auc_ci_high', float('nan')):.3f}], "
               f"accuracy {p['pooled_accuracy']:.3f}")
    g = s["patient"]
    click.echo(f"patient level ({g['patient_groups']} groups, mean p_covid per group): AUC "
               f"{with_interval(g['patient_roc_auc'], g.get('patient_roc_auc_ci_low'), g.get('patient_roc_auc_ci_high'))}")
    c = s["compute"]
    cost = (f"{c['wall_seconds'] / 60:.1f} min wall, {c['cpu_seconds'] / 60:.1f} min CPU"
            if c["wall_seconds"] is not None else "not recorded for every fold")
    click.echo(f"compute: {cost} -> {result.out / 'summary.json'}")


COMMANDS: list[click.Command] = [cv]
