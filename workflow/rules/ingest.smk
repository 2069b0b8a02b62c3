rule make_phantom:
    output:
        image=f"{R}/ingest/phantom/volume-{{case}}.nii.gz",
        label=f"{R}/ingest/phantom/segmentation-{{case}}.nii.gz",
    log:
        f"{R}/logs/ingest/phantom-{{case}}.log",
    params:
        seed=lambda wc: config["dataset"]["phantom"]["seed"] * 1000 + int(wc.case),
        preset=config["dataset"]["phantom"]["preset"],
        size=config["dataset"]["phantom"]["size"],
        slices=config["dataset"]["phantom"]["slices"],
        max_tumours=config["dataset"]["phantom"]["max_tumours"],
    resources:
        mem_mb=2000,
        runtime=10,
        **slurm_resources("cpu"),
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg phantom --seed {params.seed} --preset {params.preset} --size {params.size} --slices {params.slices}"
        " --max-tumours {params.max_tumours} {output.image:q} {output.label:q} > {log:q} 2>&1"


rule list_cases:
    output:
        f"{R}/ingest/cases.tsv",
    log:
        f"{R}/logs/ingest/cases.log",
    params:
        cfg=json.dumps({"dataset": config["dataset"], "results": R}, sort_keys=True),
        # Not read by the command: the table is rewritten whenever the files found in the dataset change.
        found=sorted((c.case_id, c.image, c.label or "") for c in DISCOVERY.cases),
    localrule: True
    conda:
        "../../envs/imaging.yaml"
    shell:
        "python -m liverseg cases --config-json {params.cfg:q} {output:q} > {log:q} 2>&1"


rule check_case:
    input:
        unpack(existing_inputs),
    output:
        f"{R}/ingest/checks/{{case}}.json",
    log:
        f"{R}/logs/ingest/check/{{case}}.log",
    params:
        image=case_image,
        label=lambda wc: f"--label {shlex.quote(case_label(wc))}" if case_label(wc) else "",
        tol=config["ingest"]["affine_tolerance"],
    resources:
        **sized("check_case", "image", "label"),
        **slurm_resources("cpu"),
    conda:
        "../../envs/imaging.yaml"
    shell:
        # The reading runs in a child process capped at the job's memory: a case too big, or a crash, is a
        # failed verdict, never a job without one (the split waits for every verdict).
        "python -m liverseg check --case {wildcards.case:q} --image {params.image:q} {params.label}"
        " --affine-tolerance {params.tol} --max-memory-mb {resources.mem_mb} {output:q} > {log:q} 2>&1"
