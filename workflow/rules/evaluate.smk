# Evaluation: caption the raw test images from each artifact, score, time; then the table.


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
        meta=lambda wc: as_json(variant_meta(wc)),
        prep=lambda wc, input: os.path.dirname(input.info),
        out=lambda wc, output: os.path.dirname(output.metrics),
        device=config["device"],
    log:
        f"logs/evaluate/{DS}-{{enc}}-{{dec}}-{{dstage}}-{{quant}}.log",
    benchmark:
        f"logs/benchmarks/evaluate/{DS}-{{enc}}-{{dec}}-{{dstage}}-{{quant}}.tsv"
    # All cores, so no other job disturbs the latency timing (which itself uses evaluate.threads).
    conda:
        "../envs/captioning.yaml"
    threads: workflow.cores
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "{params.cli} evaluate --model {input.model} --prepared {params.prep} --out-dir {params.out}"
        " --beam-size {params.e[beam_size]} --latency-images {params.e[latency_images]}"
        " --threads {params.e[threads]} --spice {params.e[spice]} --device {params.device}"
        " --meta {params.meta:q} > {log} 2>&1"


rule table:
    message:
        "Writing the results table of {DS}"
    input:
        all_metrics(),
    output:
        csv=report("results/table.csv", caption="../report/table.rst", category="Results"),
        md="results/table.md",
        pareto=report("results/pareto.png", caption="../report/pareto.rst", category="Results"),
        summary=report("results/summary.md", caption="../report/summary.rst", category="Results"),
    params:
        cli=CAPTIONING,
        baseline=baseline_variants(),
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
        "{params.cli} table --metrics {input} --baselines {params.baseline} --out-dir results > {log} 2>&1"
