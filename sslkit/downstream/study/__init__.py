"""`sslkit study`: the label-efficiency experiment in one command (grid.py, run.py, stats.py, report.py).

How much does pretraining help when only a few volumes are labelled? A study fine-tunes every cell of the grid
(encoder, budget, seed) with one recipe:

    data.num_labelled = budget     the first `budget` cases of a seeded order of the training cases
    data.split_seed   = seed       so the subsets of one seed are nested across budgets (the 3-case subset holds
    train.seed        = seed       the 1-case subset) and identical across encoders; the seed also fixes the
                                   initial weights of the parts not loaded from an encoder, and the crops
and evaluates each cell on the recipe's validation set (`sslkit.downstream.evaluate`). `scratch` is the same
architecture and preprocessing as the first encoder's plan, from random weights (`finetune(scratch=True)`). With
`--schedule NAME=KEY=VALUE,...` every encoder is fine-tuned once per transfer schedule (arm ENCODER+NAME).

Layout of the output folder DIR:
  study.json                 the recipe, its overrides and each encoder's path and weights digest (a later run
                             into the same DIR must use the same weights per name; budgets and seeds may grow)
  <encoder>/b<budget>_s<seed>/  one fine-tuning run directory per cell (eval/metrics.json once evaluated; its
                             checkpoints/ are removed then, unless keep_checkpoints)
  timings.jsonl              one row per finished phase of a cell: wall and CPU seconds, load average
  study.csv                  one row per evaluated cell (Dice, NSD, HD95 per class; times)
  study.md, study.png, study.svg   the report: mean +- std over seeds, paired differences, each arm's mean rank,
                             task-probe Dice and pretraining cost, whether the probe ranked the arms as fine-tuning
                             did, the plot

Resumable: a cell with summary.json and eval/metrics.json is done and skipped (after checking that its resolved
config is the one this study would write); a cell stopped mid-run continues from its newest checkpoint
(resume="auto"); a cell trained but not evaluated is evaluated. A study stopped by SIGTERM / SIGUSR1 / SIGINT
writes its report of the finished cells and returns; run the same command again to continue.

Statistics. Over the seeds of one (encoder, budget): mean and sample standard deviation (ddof = 1). Paired
difference of a pretrained encoder to scratch at one budget: d_s = Dice(encoder, s) - Dice(scratch, s) over the
seeds s both finished (same subset, same crops' seed); its confidence interval is the percentile bootstrap of the
mean of d (scipy.stats.bootstrap: `resamples` means of n values drawn with replacement from d by a seeded numpy
Generator, and their (1 - level)/2 and (1 + level)/2 quantiles). The difference is called within noise when that interval holds 0.
With n <= 3 seeds the 95 % interval is [min d, max d] (each extreme resample has probability >= 1/27 > 2.5 %), so
"beyond noise" then means every seed moved the same way.
"""

from sslkit.downstream.study.grid import (
    SCRATCH,
    STUDY_FILE,
    Arm,
    Cell,
    cell_recipe,
    cell_state,
    parse_encoders,
    parse_int_list,
    parse_schedules,
    study_grid,
)
from sslkit.downstream.study.report import StudyInfo, encoder_facts, write_reports
from sslkit.downstream.study.run import StudyResult, run_cell, run_study
from sslkit.downstream.study.stats import (
    PairedDifference,
    bootstrap_ci,
    mean_ranks,
    mean_std,
    paired_differences,
    probe_agreement,
)

__all__ = ["SCRATCH", "STUDY_FILE", "Arm", "Cell", "PairedDifference", "StudyInfo", "StudyResult", "bootstrap_ci",
           "cell_recipe", "cell_state", "encoder_facts", "mean_ranks", "mean_std", "paired_differences",
           "parse_encoders", "parse_int_list", "parse_schedules", "probe_agreement", "run_cell", "run_study",
           "study_grid", "write_reports"]
