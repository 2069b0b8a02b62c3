rule overlay:
    input:
        pred=f"{R}/postprocess/{{experiment}}/{{case}}.nii.gz",
        image=case_image,
        ref=case_label,
        h5=lambda wc: h5(wc.case),
    output:
        report(
            f"{R}/report/overlays/{{experiment}}/{{case}}.png",
            category="Overlays",
            subcategory="{experiment}",
            caption="../report/overlay.rst",
        ),
    log:
        f"{R}/logs/report/overlay/{{experiment}}/{{case}}.log",
    resources:
        mem_mb=4000,
        runtime=10,
        **slurm_resources("cpu"),
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg overlay --case {wildcards.case:q} --image {input.image:q} --ref {input.ref:q}"
        " --pred {input.pred:q} --h5 {input.h5:q} --title {wildcards.experiment} {output:q} > {log:q} 2>&1"


rule summarize:
    input:
        unpack(summary_inputs),
    output:
        md=report(f"{R}/report/summary.md", category="Summary", caption="../report/summary.rst"),
        plot=report(f"{R}/report/dice_per_case.png", category="Summary", caption="../report/dice.rst"),
    log:
        f"{R}/logs/report/summarize.log",
    params:
        benchmarks=lambda wc, input: " ".join(
            shlex.quote(f"--benchmark={e}={f}") for e in evaluated_experiments() for f in getattr(input, f"timing_{e}")
        ),
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg summarize --summaries {input.summaries:q} {params.benchmarks}"
        " --out-md {output.md:q} --out-plot {output.plot:q} > {log:q} 2>&1"
