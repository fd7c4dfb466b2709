//! How one log line looks.
//!
//! `trellis up` and its five services usually share one stderr (a journal, a file),
//! so every line says which service wrote it, and, inside a span that belongs to an
//! exported trace, which trace and span: an operator greps a trace id from a tracing
//! UI and finds the lines of every service it crossed. The stock formatters have no
//! room for either, so this one writes them and leaves the rest to the stock ones.

use std::fmt;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::TraceContextExt;
use tracing::dispatcher::WeakDispatch;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Json, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The ids of the trace a line was written in, when spans are exported.
///
/// Holds the process's dispatcher (weakly: the dispatcher owns this formatter) so
/// the OpenTelemetry layer can be asked for a span's context; unset when nothing is
/// exported, where no trace exists that the ids could be looked up in.
#[derive(Clone, Default)]
pub(super) struct TraceIds(Arc<OnceLock<WeakDispatch>>);

impl TraceIds {
    pub(super) fn enable(&self, dispatch: &tracing::Dispatch) {
        let _ = self.0.set(dispatch.downgrade());
    }

    /// `(trace_id, span_id)` of the innermost span the event belongs to.
    fn of<S>(
        &self,
        ctx: &FmtContext<'_, S, impl for<'a> FormatFields<'a> + 'static>,
    ) -> Option<(String, String)>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let dispatch = self.0.get()?.upgrade()?;
        let span = ctx.event_scope()?.next()?.id();
        let context = tracing_opentelemetry::get_otel_context(&span, &dispatch)?;
        let span = context.span();
        let ids = span.span_context();
        ids.is_valid()
            .then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
    }
}

/// A line: `<time> <LEVEL> service=<name> [trace_id=… span_id=…] <spans>: <target>: <message> <fields>`,
/// or a JSON object with `service`, `trace_id` and `span_id` next to the stock fields.
pub(super) struct LineFormat {
    service: String,
    ansi: bool,
    ids: TraceIds,
    text: Format<Full, ()>,
    json: Option<Format<Json>>,
}

impl LineFormat {
    pub(super) fn new(service: &str, json: bool, ansi: bool, ids: TraceIds) -> Self {
        Self {
            service: service.to_string(),
            ansi,
            ids,
            text: Format::default()
                .without_time()
                .with_level(false)
                .with_target(true)
                .with_ansi(ansi),
            json: json.then(|| Format::default().json().with_ansi(false)),
        }
    }

    fn level(&self, writer: &mut Writer<'_>, level: Level) -> fmt::Result {
        if !self.ansi {
            return write!(writer, "{level:>5}");
        }
        let colour = match level {
            Level::ERROR => "31",
            Level::WARN => "33",
            Level::INFO => "32",
            Level::DEBUG => "34",
            Level::TRACE => "35",
        };
        write!(writer, "\x1b[{colour}m{level:>5}\x1b[0m")
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let ids = self.ids.of(ctx);
        if let Some(json) = &self.json {
            let mut line = String::new();
            json.format_event(ctx, Writer::new(&mut line), event)?;
            let Some(rest) = line.strip_prefix('{') else {
                return writer.write_str(&line);
            };
            // The service name is ours (a binary's name), so it needs no escaping; the
            // ids are hex.
            write!(writer, "{{\"service\":\"{}\",", self.service)?;
            if let Some((trace_id, span_id)) = ids {
                write!(
                    writer,
                    "\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\","
                )?;
            }
            return writer.write_str(rest);
        }
        SystemTime.format_time(&mut writer)?;
        writer.write_char(' ')?;
        self.level(&mut writer, *event.metadata().level())?;
        write!(writer, " service={}", self.service)?;
        if let Some((trace_id, span_id)) = ids {
            write!(writer, " trace_id={trace_id} span_id={span_id}")?;
        }
        writer.write_char(' ')?;
        self.text.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use opentelemetry::trace::TracerProvider as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("sink").clone()).expect("utf-8 log")
        }
    }

    /// Logs one line inside a span and one outside, with spans traced by an SDK
    /// provider (no exporter) when `traced`; returns the output and the span's ids.
    fn log(json: bool, traced: bool) -> (String, Option<(String, String)>) {
        let sink = Sink::default();
        let ids = TraceIds::default();
        let writer = sink.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .event_format(LineFormat::new("runtime", json, false, ids.clone()));
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let otel =
            traced.then(|| tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let registry = tracing_subscriber::registry().with(otel);
        let dispatch = if json {
            tracing::Dispatch::new(
                registry.with(fmt.fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())),
            )
        } else {
            tracing::Dispatch::new(registry.with(fmt))
        };
        if traced {
            ids.enable(&dispatch);
        }
        let expected = tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!("grpc", rpc.path = "/runtime.v1.RuntimeService/Version");
            let expected = {
                let _entered = span.enter();
                tracing::warn!(code = "NotFound", "CRI call failed");
                let context = span.context();
                let ids = context.span().span_context().clone();
                ids.is_valid()
                    .then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
            };
            tracing::info!("outside");
            expected
        });
        (sink.text(), expected)
    }

    #[test]
    fn text_lines_name_the_service_and_the_trace_without_colour() {
        let (log, expected) = log(false, true);
        let (trace_id, span_id) = expected.expect("a traced span");
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(!log.contains('\x1b'), "no ANSI codes: {log:?}");
        assert!(
            lines[0].contains(&format!(
                " WARN service=runtime trace_id={trace_id} span_id={span_id} grpc{{"
            )),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains("CRI call failed code=\"NotFound\""),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains(" INFO service=runtime "), "{}", lines[1]);
        assert!(
            !lines[1].contains("trace_id"),
            "outside any span: {}",
            lines[1]
        );
    }

    #[test]
    fn json_lines_carry_service_and_trace_fields() {
        let (log, expected) = log(true, true);
        let (trace_id, span_id) = expected.expect("a traced span");
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert_eq!(lines[0]["service"], "runtime");
        assert_eq!(lines[0]["trace_id"], trace_id.as_str());
        assert_eq!(lines[0]["span_id"], span_id.as_str());
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["fields"]["code"], "NotFound");
        assert_eq!(lines[1]["service"], "runtime");
        assert!(lines[1].get("trace_id").is_none(), "{}", lines[1]);
    }

    #[test]
    fn without_an_exporter_lines_carry_no_ids() {
        let (log, expected) = log(false, false);
        assert!(expected.is_none());
        assert!(!log.contains("trace_id"), "{log}");
        assert!(log.contains(" WARN service=runtime grpc{"), "{log}");
    }
}
