# The captioning-compression experiment. Logic lives in the `captioning` package;
# the rules in workflow/rules only wire files together.

# The experiment's config: config.yaml, or the files given with --configfile instead (each a
# whole experiment, e.g. configs/coco.yaml; Snakemake would otherwise merge them into config.yaml,
# and the default experiment's encoders and decoders would join the run).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/package.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        rules.table.output,


onerror:
    print("The workflow failed: each rule's log is under logs/<rule>/ (see the error above).")
