rule plan:
    input:
        split=f"{R}/split/split.json",
        checks=[check_file(c) for c in CASES],
        cases=f"{R}/ingest/cases.tsv",
    output:
        PLAN,
    log:
        f"{R}/logs/plan/plan.log",
    params:
        spacing=config["slices"]["spacing_mm"],
        size=config["slices"]["size"],
        fov=config["slices"]["fov_mm"],
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg plan --split {input.split:q} --checks {input.checks:q} --spacing-mm {params.spacing}"
        " --size {params.size} --fov-mm {params.fov} --cases {input.cases:q} {output:q} > {log:q} 2>&1"


rule preprocess:
    input:
        unpack(existing_inputs),
        plan=PLAN,
    output:
        f"{R}/preprocess/{{case}}.h5",
    log:
        f"{R}/logs/preprocess/{{case}}.log",
    params:
        image=case_image,
        label=lambda wc: f"--label {shlex.quote(case_label(wc))}" if case_label(wc) else "",
        lower=config["window"]["lower"],
        upper=config["window"]["upper"],
        mode=config["window"]["mode"],
        tol=config["ingest"]["affine_tolerance"],
    resources:
        # A storage choice, not a content choice: as a resource (not a rerun trigger) a change applies to cases
        # written from then on and reruns nothing (params would rewrite every HDF5 file and retrain every model).
        compression=config["slices"]["compression"],
        **sized("preprocess", "image", "label"),
        **slurm_resources("cpu"),
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg preprocess --case {wildcards.case:q} --image {params.image:q} {params.label}"
        " --lower {params.lower} --upper {params.upper} --mode {params.mode} --plan {input.plan:q}"
        " --affine-tolerance {params.tol} --compression {resources.compression} {output:q} > {log:q} 2>&1"
