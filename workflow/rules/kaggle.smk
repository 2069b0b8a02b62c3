rule kaggle_submission:
    input:
        preds=lambda wc: [f"{R}/postprocess/{kaggle_experiment()}/{c}.nii.gz" for c in kaggle_cases()],
        sample=lambda wc: kaggle_sample() or [],
    output:
        f"{R}/kaggle/submission.csv",
    log:
        f"{R}/logs/kaggle/submission.log",
    params:
        pairs=lambda wc, input: [f"{c}={p}" for c, p in zip(kaggle_cases(), input.preds)],
        sample=lambda wc: f"--sample {shlex.quote(kaggle_sample())}" if kaggle_sample() else "",
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg kaggle --out {output:q} {params.sample} {params.pairs:q} > {log:q} 2>&1"


rule kaggle:
    input:
        rules.kaggle_submission.output,
    localrule: True
