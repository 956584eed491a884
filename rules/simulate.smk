# The built-in simulated survey (input.source: simulated): truth and reference
# catalog, one job per science exposure writing every detector's file, and one
# job for all calibration exposures (cheap frames, not worth a job each).
if plan.simulated:

    rule simulate_scene:
        output:
            truth_object_path=paths.path("truth_object"),
            truth_lightcurve_path=paths.path("truth_lightcurve"),
            truth_ccdvisit_path=paths.path("truth_ccdvisit"),
            truth_amplifier_path=paths.path("truth_amplifier"),
            refcat_path=paths.path("sim_refcat"),
        params:
            step="simulate:simulate_scene",
            preset=plan.config["sim"]["preset"],
            seed=plan.config["sim"]["seed"],
        log:
            paths.root / "logs/simulate_scene.log",
        benchmark:
            paths.root / "benchmarks/simulate_scene.tsv"
        conda:
            "../envs/drp.yaml"
        script:
            "../scripts/run_step.py"

    rule simulate_exposure:
        input:
            truth_object_path=paths.path("truth_object"),
        output:
            plan.sim_exposure_outputs(),
        params:
            step="simulate:simulate_exposures",
            preset=plan.config["sim"]["preset"],
            seed=plan.config["sim"]["seed"],
            image_format=plan.image_format,
            output_paths=plan.sim_output_paths,
        log:
            paths.root / "logs/simulate_exposure/simulate_exposure_{exposure}.log",
        benchmark:
            paths.root / "benchmarks/simulate_exposure/simulate_exposure_{exposure}.tsv"
        conda:
            "../envs/drp.yaml"
        script:
            "../scripts/run_step.py"

    if plan.sim_calibration_outputs:

        # Calibration files match simulate_exposure's pattern too.
        ruleorder: simulate_calibrations > simulate_exposure

        rule simulate_calibrations:
            output:
                plan.sim_calibration_outputs,
            params:
                step="simulate:simulate_exposures",
                preset=plan.config["sim"]["preset"],
                seed=plan.config["sim"]["seed"],
                image_format=plan.image_format,
                output_paths=plan.sim_calibration_paths,
            log:
                paths.root / "logs/simulate_calibrations.log",
            benchmark:
                paths.root / "benchmarks/simulate_calibrations.tsv"
            conda:
                "../envs/drp.yaml"
            script:
                "../scripts/run_step.py"
