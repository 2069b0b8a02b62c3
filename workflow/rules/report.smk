rule overlay:
    input:
        pred=f"{R}/postprocess/{{experiment}}/{{case}}.nii.gz",
    output:
        report(
            f"{R}/report/overlays/{{experiment}}/{{case}}.png",
            category="Overlays",
            subcategory="{experiment}",
            caption="../report/overlay.rst",
        ),
    log:
        f"{R}/logs/report/overlay/{{experiment}}/{{case}}.log",
    params:
        image=case_image,
        ref=case_label,
    resources:
        mem_mb=4000,
        runtime=10,
        **slurm_resources("cpu"),
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg overlay --case {wildcards.case:q} --image {params.image:q} --ref {params.ref:q}"
        " --pred {input.pred:q} --title {wildcards.experiment} {output:q} > {log:q} 2>&1"


rule summarize:
    input:
        summaries=expand(f"{R}/evaluate/{{experiment}}/{{stage}}/summary.json", experiment=config["experiments"], stage=["raw", "post"]),
        benchmarks=lambda wc: expand(
            f"{R}/benchmarks/predict/{{experiment}}/{{case}}.tsv", experiment=config["experiments"], case=test_cases()
        ),
    output:
        md=report(f"{R}/report/summary.md", category="Summary", caption="../report/summary.rst"),
        plot=report(f"{R}/report/dice_per_case.png", category="Summary", caption="../report/dice.rst"),
    log:
        f"{R}/logs/report/summarize.log",
    params:
        experiments=config["experiments"],
        # <metrics>/<experiment>/<stage>/summary.json and <benchmarks>/<experiment>/<case>.tsv
        metrics=lambda wc, input: str(Path(input.summaries[0]).parents[2]),
        benchmarks=lambda wc, input: str(Path(input.benchmarks[0]).parents[1]),
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg summarize --experiments {params.experiments} --metrics-dir {params.metrics:q}"
        " --benchmarks-dir {params.benchmarks:q} --out-md {output.md:q} --out-plot {output.plot:q} > {log:q} 2>&1"
