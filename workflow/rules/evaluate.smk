# Evaluation: caption the raw test images from each artifact and score them; time every artifact; then the table.


rule evaluate:
    message:
        "Evaluating variant {wildcards.enc}-{wildcards.dec}-{wildcards.dstage}-{wildcards.quant}"
    input:
        model=rules.pack.output,
        refs=rules.prepare_captions.output.refs_test,
        images=rules.prepare_captions.output.images,
        info=rules.prepare_captions.output.info,
    output:
        metrics=f"results/eval/{DS}/{{enc}}-{{dec}}-{{dstage}}-{{quant}}/metrics.json",
        captions=f"results/eval/{DS}/{{enc}}-{{dec}}-{{dstage}}-{{quant}}/captions.json",
    params:
        cli=CAPTIONING,
        e=config["evaluate"],
        meta=variant_meta,
        prep=lambda wc, input: os.path.dirname(input.info),
        out=lambda wc, output: os.path.dirname(output.metrics),
        device=config["device"],
    log:
        f"logs/evaluate/{DS}-{{enc}}-{{dec}}-{{dstage}}-{{quant}}.log",
    benchmark:
        f"logs/benchmarks/evaluate/{DS}-{{enc}}-{{dec}}-{{dstage}}-{{quant}}.tsv"
    conda:
        "../envs/captioning.yaml"
    # Latency is timed apart (rule latency), so evaluations can run beside other jobs.
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "{params.cli} evaluate --model {input.model} --prepared {params.prep} --out-dir {params.out}"
        " --beam-size {params.e[beam_size]} --latency-images 0 --threads {threads}"
        " --spice {params.e[spice]} --device {params.device} --meta {params.meta:q} > {log} 2>&1"


rule latency:
    message:
        "Timing every artifact of {DS} on CPU"
    input:
        models=all_artifacts(),
        images=rules.prepare_captions.output.images,
        info=rules.prepare_captions.output.info,
    output:
        f"results/latency/{DS}.json",
    params:
        cli=CAPTIONING,
        e=config["evaluate"],
        prep=lambda wc, input: os.path.dirname(input.info),
    log:
        f"logs/latency/{DS}.log",
    benchmark:
        f"logs/benchmarks/latency/{DS}.tsv"
    conda:
        "../envs/captioning.yaml"
    # All cores, so no other job disturbs the timing (which itself uses evaluate.threads); one job
    # times every artifact back to back, so the rows compare.
    threads: workflow.cores
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "{params.cli} latency --models {input.models} --prepared {params.prep} --images {params.e[latency_images]}"
        " --beam-size {params.e[beam_size]} --threads {params.e[threads]} --out {output} > {log} 2>&1"


rule table:
    message:
        "Writing the results table of {DS}"
    input:
        metrics=all_metrics(),
        latency=rules.latency.output,
    output:
        csv=report("results/table.csv", caption="../report/table.rst", category="Results"),
        md="results/table.md",
        pareto=report("results/pareto.png", caption="../report/pareto.rst", category="Results"),
        summary=report("results/summary.md", caption="../report/summary.rst", category="Results"),
    params:
        cli=CAPTIONING,
        baseline=baseline_names(),
    log:
        "logs/table/table.log",
    benchmark:
        "logs/benchmarks/table/table.tsv"
    conda:
        "../envs/captioning.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.cli} table --metrics {input.metrics} --latency {input.latency} --baselines {params.baseline}"
        " --out-dir results > {log} 2>&1"
