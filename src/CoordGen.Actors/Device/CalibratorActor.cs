using System.Diagnostics;
using Akka.Actor;
using CoordGen.Engine.Speculative;

namespace CoordGen.Actors.Device;

/// <summary>
/// The calibrator (paper §3.3) on its own thread: it gathers the top-k next tokens of every prompt
/// position from copies of the prefill chunks' top-k rows while the device computes the next chunks (or
/// other sessions' steps), and at the end of the prefill builds the calibrated index and hands it
/// back. The session starts decoding without waiting for it; calibrated drafts join from the next
/// step after the index arrives. A failure here degrades that session to the other draft sources.
/// </summary>
public sealed class CalibratorActor : ReceiveActor
{
    /// <summary>Per session being calibrated: the top-k read so far (null once a chunk failed) and the time spent.</summary>
    private readonly Dictionary<object, (PrefillTopK? TopK, double Ms)> _open = [];

    public CalibratorActor()
    {
        Receive<CalibrateChunk>(c =>
        {
            long t0 = Stopwatch.GetTimestamp();
            if (!_open.TryGetValue(c.Key, out var state))
            {
                state = (new PrefillTopK(c.Options.TopK), 0);
            }

            try
            {
                state.TopK?.Add(c.Rows);
            }
            catch (Exception ex) when (ex is not OutOfMemoryException)
            {
                state.TopK = null; // Finish reports the failure; the session drafts without calibration
            }

            _open[c.Key] = (state.TopK, state.Ms + Stopwatch.GetElapsedTime(t0).TotalMilliseconds);
        });
        Receive<CalibrateFinish>(f =>
        {
            using var span = Telemetry.Source.StartActivity("coordgen.calibrate", ActivityKind.Internal, f.Trace);
            long t0 = Stopwatch.GetTimestamp();
            CalibratedIndex? index = null;
            double ms = 0;
            if (_open.Remove(f.Key, out var state) && state.TopK is { } topK)
            {
                ms = state.Ms;
                try
                {
                    index = CalibratedIndex.Build(f.Prompt, topK, f.Options);
                }
                catch (Exception ex) when (ex is not OutOfMemoryException)
                {
                    span?.SetStatus(ActivityStatusCode.Error, ex.Message);
                }
            }

            ms += Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
            span?.SetTag("coordgen.session", f.SessionId);
            span?.SetTag("coordgen.calibrated_paths", index?.Paths ?? 0);
            span?.SetTag("coordgen.context_tokens", f.Prompt.Length);
            Sender.Tell(new Calibrated(f.Key, index, ms));
        });
        Receive<CalibrateCancel>(c => _open.Remove(c.Key));
    }

    public static Props Props() => Akka.Actor.Props.Create(() => new CalibratorActor());
}

/// <summary>Device → calibrator: the top-k rows of one prefill chunk (a copy the calibrator owns), in order.</summary>
public sealed record CalibrateChunk(object Key, TopRows Rows, CalibrationOptions Options);

/// <summary>Device → calibrator: the prefill of <paramref name="Prompt"/> is done; build its calibrated index.</summary>
public sealed record CalibrateFinish(object Key, string SessionId, int[] Prompt, CalibrationOptions Options, ActivityContext Trace = default);

/// <summary>Device → calibrator: the session is gone; drop what was read for it.</summary>
public sealed record CalibrateCancel(object Key);

/// <summary>Calibrator → device: the calibrated index (null when calibration failed) and the calibrator's time on it.</summary>
public sealed record Calibrated(object Key, CalibratedIndex? Index, double Ms);
