//! End-to-end tests against a real kube-apiserver. One control plane serves the whole run (see
//! `e2e::Env`); each test gets its own namespace. Run with `cargo test -p e2e`; filter by name as
//! with any cargo test (`cargo test -p e2e -- leader`).

mod api;
mod chart;
mod gateway;
mod identity;
mod leader;
mod rollout;
mod segmentation;
mod webhooks;

use std::{future::Future, pin::Pin, process::ExitCode, sync::Arc};

use e2e::Env;
use libtest_mimic::{Arguments, Trial};

type TestFn = fn(Arc<Env>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

macro_rules! tests {
    ($($module:ident :: $name:ident),* $(,)?) => {
        vec![$((concat!(stringify!($module), "::", stringify!($name)),
            (|env| Box::pin($module::$name(env))) as TestFn)),*]
    };
}

fn all_tests() -> Vec<(&'static str, TestFn)> {
    tests![
        api::crds_install_and_become_established,
        api::examples_apply_with_kubectl,
        api::invalid_objects_are_rejected_with_useful_messages,
        api::status_is_written_by_server_side_apply_without_touching_spec,
        api::status_writers_do_not_clobber_each_other,
        identity::a_device_enrolls_with_an_openssl_csr_and_renews,
        identity::bad_csrs_are_denied_with_their_reasons,
        identity::a_request_approved_by_someone_else_is_not_trusted,
        identity::retire_and_delete_clean_up_every_owned_object,
        identity::an_unchanged_enrolled_device_costs_zero_writes,
        identity::an_operator_restarted_mid_enrollment_converges_without_duplicates,
        identity::a_certificate_inside_its_renewal_window_is_flagged,
        gateway::the_agent_enrolls_with_a_token_and_checks_in,
        gateway::the_agent_enrolls_with_a_manufacturer_certificate,
        gateway::curl_and_openssl_enroll_and_check_in_by_hand,
        gateway::refused_requests_say_why,
        gateway::a_quarantined_device_may_only_report,
        gateway::last_seen_writes_are_throttled,
        leader::one_of_two_operators_leads_and_a_standby_takes_over_after_a_kill,
        leader::sigterm_releases_the_lease_for_an_immediate_takeover,
        rollout::two_hundred_devices_update_in_four_waves_through_soak_approval_and_an_operator_kill,
        rollout::failing_canaries_halt_the_first_wave_and_roll_back,
        rollout::devices_refuse_bad_firmware_and_report_why,
        segmentation::two_zones_with_a_conduit_get_exactly_the_expected_policies,
        segmentation::quarantined_and_non_compliant_devices_are_isolated_and_released,
        segmentation::the_audit_reports_unisolated_pods_leaks_unknown_zones_and_overlaps,
        webhooks::the_api_server_calls_our_webhooks_and_shows_their_messages,
        chart::helm_installs_and_uninstalls_the_chart,
        chart::the_operator_and_gateway_work_with_the_charts_rbac_only,
    ]
}

/// Tests that load the machine heavily; they run after the others, one at a time, so the
/// timing-sensitive tests (leader failover) are not judged on a saturated machine.
fn heavy_tests() -> Vec<(&'static str, TestFn)> {
    tests![
        gateway::a_thousand_simulated_devices_enroll_and_check_in,
        rollout::a_thousand_devices_roll_out_with_zero_soak,
        rollout::an_api_server_outage_mid_rollout_loses_and_double_counts_nothing,
        gateway::a_gateway_restart_under_a_thousand_devices_brings_them_back_without_a_herd,
    ]
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let tests = all_tests();
    if args.list {
        let trials = tests
            .into_iter()
            .map(|(name, _)| Trial::test(name, || Ok(())))
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("e2e: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let env = match runtime.block_on(Env::start()) {
        Ok(env) => Arc::new(env),
        Err(e) => {
            eprintln!("e2e: cannot set up the test cluster: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "e2e: cluster ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let handle = runtime.handle().clone();
    let trials = |tests: Vec<(&'static str, TestFn)>| -> Vec<Trial> {
        tests
            .into_iter()
            .map(|(name, test)| {
                let env = env.clone();
                let handle = handle.clone();
                Trial::test(name, move || {
                    handle
                        .block_on(test(env))
                        .map_err(|e| format!("{e:#}").into())
                })
            })
            .collect()
    };
    let conclusion = libtest_mimic::run(&args, trials(tests));
    let mut serial = args.clone();
    serial.test_threads = Some(1);
    let heavy = libtest_mimic::run(&serial, trials(heavy_tests()));

    match Arc::try_unwrap(env) {
        Ok(env) => runtime.block_on(env.stop()),
        Err(_) => eprintln!("e2e: a test still holds the environment; control plane left running"),
    }
    eprintln!("e2e: finished in {:.1}s", started.elapsed().as_secs_f64());
    if conclusion.has_failed() || heavy.has_failed() {
        ExitCode::from(101)
    } else {
        ExitCode::SUCCESS
    }
}
