rule evaluate_case:
    input:
        pred=stage_prediction,
        ref=case_label,
    output:
        f"{R}/evaluate/{{experiment}}/{{stage}}/cases/{{case}}.tsv",
    log:
        f"{R}/logs/evaluate/{{experiment}}/{{stage}}/{{case}}.log",
    params:
        tol=config["ingest"]["affine_tolerance"],
    resources:
        **sized("evaluate_case", "pred", "ref"),
        **slurm_resources("cpu"),
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg evaluate-case --case {wildcards.case:q} --pred {input.pred:q} --ref {input.ref:q}"
        " --affine-tolerance {params.tol}"
        " {output:q} > {log:q} 2>&1"


rule aggregate_metrics:
    input:
        lambda wc: [f"{R}/evaluate/{wc.experiment}/{wc.stage}/cases/{c}.tsv" for c in test_cases()],
    output:
        tsv=report(
            f"{R}/evaluate/{{experiment}}/{{stage}}/per_case.tsv",
            category="Metrics",
            subcategory="{experiment}",
            caption="../report/per_case.rst",
        ),
        json=f"{R}/evaluate/{{experiment}}/{{stage}}/summary.json",
    log:
        f"{R}/logs/evaluate/{{experiment}}/{{stage}}/aggregate.log",
    params:
        extra=lambda wc: json.dumps(
            {
                "experiment": wc.experiment,
                "stage": wc.stage,
                "predict_only_skipped": UNLABELLED,
                "failed_cases": split_data()["failed"],
                "rejected_cases": dict(DISCOVERY.rejected),
                # only for a fold ensemble, so that a single-model run's params stay as they were
                **({"ensemble_folds": len(FOLDS)} if ENSEMBLE and parse_experiment(wc.experiment)[1] is None else {}),
            }
        ),
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg aggregate --out-tsv {output.tsv:q} --out-json {output.json:q}"
        " --extra-json {params.extra:q} {input:q} > {log:q} 2>&1"
