using System.Diagnostics;
using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Scheduling;
using CoordGen.Engine.Speculative;

namespace CoordGen.Actors.Device;

/// <summary>
/// Batch assembly: what one device run carries, off the mailbox thread. A run is one session's own step
/// (<see cref="Solo"/>), a packed width-1 run of several sessions (plain tokens and
/// speculative roots alone), a packed run of several speculative sessions' trees at one width, or a prefill
/// chunk with plain sessions' width-1 steps or speculative sessions' trees riding beside it (<see cref="Mixed"/>). Each session's rows go back to it, and
/// a speculative session's rows on to the verifier.
/// </summary>
internal static class DeviceSteps
{
    /// <summary>
    /// One device step: <paramref name="pick"/>'s own step, or a packed run of <paramref name="group"/>
    /// (plain when <paramref name="packWidth"/> is 1, else trees of that width; a prefill chunk of <paramref name="pick"/>'s
    /// with the rest of the group riding when <paramref name="pick"/> is prefilling); with <paramref name="paceMs"/>
    /// &gt; 0 the step is held until that long has passed (what-if pacing). Returns its Stopwatch timestamps,
    /// whether it overran the pace, and of its time what riders are charged.
    /// </summary>
    public static (long Start, long End, bool Overran, double RidersMs) Run(DeviceSession pick, List<DeviceSession>? group, int packWidth, OrtModelRuntime runtime,
        Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops, PrefixCache? prefix, double paceMs)
    {
        long start = Stopwatch.GetTimestamp();
        foreach (var s in group ?? [pick])
        {
            s.StepStarting();
        }

        double ridersMs = 0;
        if (group is null)
        {
            Solo(pick, runtime, plain, spec, stops, prefix);
        }
        else if (!pick.Decoding)
        {
            ridersMs = Mixed(pick, group.GetRange(1, group.Count - 1), packWidth, runtime, plain, spec, stops, prefix);
        }
        else if (packWidth == 1)
        {
            Narrow(group, runtime);
        }
        else
        {
            Trees(group, packWidth);
        }

        double left = paceMs - Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        if (paceMs > 0 && left > 0)
        {
            Thread.Sleep(TimeSpan.FromMilliseconds(left));
        }

        return (start, Stopwatch.GetTimestamp(), paceMs > 0 && left < 0, ridersMs);
    }

    /// <summary>One session's own step, traced: a span per step (child of the caller's trace) and busy-time metrics.</summary>
    public static void Solo(DeviceSession s, OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops, PrefixCache? prefix)
    {
        string kind = s.StepKind;
        using var span = Telemetry.Source.StartActivity($"coordgen.{kind}", ActivityKind.Internal, s.Request.Trace);
        span?.SetTag("coordgen.session", s.Request.SessionId.Value);
        span?.SetTag("coordgen.method", s.Request.Method);
        long t0 = Stopwatch.GetTimestamp();
        int before = s.Produced;
        try
        {
            s.Step(runtime, plain, spec, stops, prefix);
        }
        catch (Exception ex)
        {
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            throw;
        }
        finally
        {
            Telemetry.DeviceBusy.Add(Stopwatch.GetElapsedTime(t0).TotalSeconds, new KeyValuePair<string, object?>("step", kind));
            int emitted = s.Produced - before;
            if (emitted > 0)
            {
                Telemetry.Tokens.Add(emitted, new KeyValuePair<string, object?>("method", s.Request.Method));
                span?.SetTag("coordgen.tokens", emitted);
            }
        }
    }

    /// <summary>
    /// One prefill chunk of <paramref name="chunk"/>'s with <paramref name="riders"/>' steps in the same run, traced as one
    /// span: with <paramref name="width"/> 1 their width-1 steps (plain tokens, decision 0026; the engine takes speculative
    /// roots alone too, the device does not send them), counted under <c>ar</c>; wider, speculative sessions' trees of
    /// that width, each then to the verifier as after a packed tree run (decision 0029). Returns what the riders are
    /// charged of the run's time.
    /// </summary>
    public static double Mixed(DeviceSession chunk, IReadOnlyList<DeviceSession> riders, int width, OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops, PrefixCache? prefix)
    {
        using var span = Telemetry.Source.StartActivity("coordgen.prefill_mixed", ActivityKind.Internal, chunk.Request.Trace);
        span?.SetTag("coordgen.session", chunk.Request.SessionId.Value);
        span?.SetTag("coordgen.riders", riders.Count);
        span?.SetTag("coordgen.rider_width", width);
        span?.SetTag("coordgen.session_ids", string.Join(',', riders.Select(a => a.Request.SessionId.Value)));
        long t0 = Stopwatch.GetTimestamp();
        int before = riders.Sum(a => a.PlainTokens), first = chunk.Produced;
        try
        {
            if (width >= 2)
            {
                var trees = SpeculativeSession.TakeTrees([.. riders.Select(a => a.SpeculativeState)], width, ownRows: true);
                chunk.Step(runtime, plain, spec, stops, prefix, trees);
                for (int i = 0; i < riders.Count; i++)
                {
                    riders[i].VerifyPacked(trees.Results![i], width);
                }

                Thread.Yield(); // as after a packed tree run: the verifier's worker gets this core now
                return chunk.LastRidersMs;
            }

            chunk.Step(runtime, plain, spec, stops, prefix, new NarrowRiders(runtime, [.. riders.Select(a => a.BeginPackedNarrow())]));
            foreach (var a in riders)
            {
                a.EndPackedNarrow();
            }

            return chunk.LastRidersMs;
        }
        catch (Exception ex)
        {
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            throw;
        }
        finally
        {
            Telemetry.DeviceBusy.Add(Stopwatch.GetElapsedTime(t0).TotalSeconds, new KeyValuePair<string, object?>("step", "prefill_mixed"));
            Telemetry.Tokens.Add(riders.Sum(a => a.PlainTokens) - before, new KeyValuePair<string, object?>("method", "ar"));
            Telemetry.Tokens.Add(chunk.Produced - first, new KeyValuePair<string, object?>("method", chunk.Request.Method)); // its first token, after its last chunk
        }
    }

    /// <summary>One packed width-1 run: plain sessions' next tokens and speculative sessions' roots alone, each in its own slot; traced as one span, tokens counted under <c>ar</c>.</summary>
    public static void Narrow(IReadOnlyList<DeviceSession> group, OrtModelRuntime runtime)
    {
        using var span = Telemetry.Source.StartActivity("coordgen.decode_packed", ActivityKind.Internal, group[0].Request.Trace);
        span?.SetTag("coordgen.sessions", group.Count);
        span?.SetTag("coordgen.session_ids", string.Join(',', group.Select(a => a.Request.SessionId.Value)));
        long t0 = Stopwatch.GetTimestamp();
        int before = group.Sum(a => a.PlainTokens);
        try
        {
            NarrowSteps.RunPacked(runtime, [.. group.Select(a => a.BeginPackedNarrow())]);
            foreach (var a in group)
            {
                a.EndPackedNarrow();
            }
        }
        catch (Exception ex)
        {
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            throw;
        }
        finally
        {
            Telemetry.DeviceBusy.Add(Stopwatch.GetElapsedTime(t0).TotalSeconds, new KeyValuePair<string, object?>("step", "decode_packed"));
            Telemetry.Tokens.Add(group.Sum(a => a.PlainTokens) - before, new KeyValuePair<string, object?>("method", "ar"));
        }
    }

    /// <summary>One packed run of several speculative sessions' trees at one width (wider trees cut, narrower ones padded): each tree in its own slot against its own cache, then each to the verifier, as a solo step does.</summary>
    public static void Trees(IReadOnlyList<DeviceSession> group, int width)
    {
        using var span = Telemetry.Source.StartActivity("coordgen.device_run_packed", ActivityKind.Internal, group[0].Request.Trace);
        span?.SetTag("coordgen.sessions", group.Count);
        span?.SetTag("coordgen.width", width);
        span?.SetTag("coordgen.session_ids", string.Join(',', group.Select(a => a.Request.SessionId.Value)));
        long t0 = Stopwatch.GetTimestamp();
        try
        {
            var trees = SpeculativeSession.BeginPacked([.. group.Select(a => a.SpeculativeState)], width, ownRows: true);
            for (int i = 0; i < group.Count; i++)
            {
                group[i].VerifyPacked(trees[i], width);
            }

            Thread.Yield(); // as in a solo step: the verifier's worker gets this core now
        }
        catch (Exception ex)
        {
            span?.SetStatus(ActivityStatusCode.Error, ex.Message);
            throw;
        }
        finally
        {
            Telemetry.DeviceBusy.Add(Stopwatch.GetElapsedTime(t0).TotalSeconds, new KeyValuePair<string, object?>("step", "device_run_packed"));
        }
    }
}
