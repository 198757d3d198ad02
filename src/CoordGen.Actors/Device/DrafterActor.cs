using Akka.Actor;

namespace CoordGen.Actors.Device;

/// <summary>
/// The CPU drafter: prepares a session's next token tree while the device verifies another session's
/// step, so drafting time hides behind device time. Jobs run one at a time on this actor's own thread
/// (the device never hands over a session it is stepping, so a job owns its session while it runs).
/// </summary>
public sealed class DrafterActor : ReceiveActor
{
    public DrafterActor()
    {
        Receive<DraftJob>(job =>
        {
            using var span = Telemetry.Source.StartActivity("coordgen.draft", System.Diagnostics.ActivityKind.Internal, job.Trace);
            span?.SetTag("coordgen.session", job.Session);
            long start = System.Diagnostics.Stopwatch.GetTimestamp();
            bool prepared;
            try
            {
                prepared = job.Prepare();
            }
            catch (Exception ex) when (ex is not OutOfMemoryException)
            {
                // The step will draft inline (and degrade to plain verification if drafting keeps failing).
                prepared = false;
            }

            Sender.Tell(new Drafted(job.Key, start, System.Diagnostics.Stopwatch.GetTimestamp(), prepared));
        });
        Receive<PreDraftJob>(PreDraft);
    }

    public static Props Props() => Akka.Actor.Props.Create(() => new DrafterActor());

    private void PreDraft(PreDraftJob job)
    {
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        bool prepared;
        try
        {
            prepared = job.Work();
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            prepared = false;
        }

        Sender.Tell(new Drafted(null, start, System.Diagnostics.Stopwatch.GetTimestamp(), prepared));
    }
}

/// <summary>Device → drafter: prepare the draft of the session identified by <paramref name="Key"/>.</summary>
public sealed record DraftJob(object Key, Func<bool> Prepare)
{
    /// <summary>The request's trace context (the draft span's parent).</summary>
    public System.Diagnostics.ActivityContext Trace { get; init; }

    /// <summary>The request's session id (a span attribute).</summary>
    public string? Session { get; init; }
}

/// <summary>
/// Device → drafter, sent when a session's verification starts: draft that session's next step for
/// the likely outcome of this one (<see cref="CoordGen.Engine.Speculative.SpeculativeSession.DuringVerify"/>);
/// the session uses it only if that outcome happens, and ignores a job that starts too late.
/// </summary>
public sealed record PreDraftJob(Func<bool> Work);

/// <summary>Drafter → device: the draft is ready (or there was nothing to draft); timestamps for the overlap report. <paramref name="Key"/> is null for a <see cref="PreDraftJob"/>.</summary>
public sealed record Drafted(object? Key, long Start, long End, bool Prepared);
