# Evaluation: score every variant's test captions (rule pack wrote them from its artifact); time every
# artifact; then the table.


rule score:
    message:
        "Scoring the test captions of every variant of {DS}"
    input:
        captions=all_eval_files("captions.json"),
        variants=all_eval_files("variant.json"),
        refs=rules.prepare_captions.output.refs_test,
    output:
        all_eval_files("metrics.json"),
    params:
        cli=CAPTIONING,
        dirs=lambda wc, input: [os.path.dirname(c) for c in input.captions],
        spice=config["evaluate"]["spice"],
        cache=f"{WORK}/scores",
        # a new scorer version rescores everything (the cache keys hold it too)
        scorer=f"pycocoevalcap {version('pycocoevalcap')}",
    log:
        f"logs/score/{DS}.log",
    benchmark:
        f"logs/benchmarks/score/{DS}.tsv"
    conda:
        "../envs/captioning.yaml"
    # One job for all variants: the tokenizer's and METEOR's JVMs start once, and the scores of
    # captions that did not change come from the cache (keyed by their hash), so a rerun after one
    # variant changed costs one start-up and that variant's scoring.
    threads: 1
    resources:
        mem_mb=job("score", "mem_mb"),
        runtime=job("score", "runtime"),
    shell:
        "{params.cli} score --refs {input.refs} --eval-dirs {params.dirs} --cache {params.cache}"
        " --spice {params.spice} > {log} 2>&1"


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
        mem_mb=job("latency", "mem_mb"),
        runtime=job("latency", "runtime"),
    shell:
        "{params.cli} latency --models {input.models} --prepared {params.prep} --images {params.e[latency_images]}"
        " --beam-size {params.e[beam_size]} --threads {params.e[threads]} --out {output} > {log} 2>&1"


rule table:
    message:
        "Writing the results table of {DS}"
    input:
        metrics=all_eval_files("metrics.json"),
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
        mem_mb=job("table", "mem_mb"),
        runtime=job("table", "runtime"),
    shell:
        "{params.cli} table --metrics {input.metrics} --latency {input.latency} --baselines {params.baseline}"
        " --out-dir results > {log} 2>&1"
