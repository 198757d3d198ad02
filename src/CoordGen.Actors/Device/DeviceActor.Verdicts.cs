using CoordGen.Messages;

namespace CoordGen.Actors.Device;

/// <summary>The device's side of its drafter and verifier: trees offered for the next steps, and verdicts applied to the sessions they belong to (stale ones dropped).</summary>
public sealed partial class DeviceActor
{
    private void OnProposal(DrafterProtocol.Proposal p)
    {
        _timeline.Drafted(p.Work, p.Ahead);
        if (_byId.TryGetValue(p.Run, out var s))
        {
            s.Offer(p);
            Schedule();
        }
    }

    private void OnVerified(VerifierProtocol.Verified v)
    {
        _timeline.Verified(v.Start, v.End);
        if (!_byId.TryGetValue(v.Run, out var s) || !_queues.Decoding.Contains(s) || s.AwaitingStep != v.Verdict.Step)
        {
            return; // stale: the session ended (cancelled, failed) or the verdict is for another step
        }

        s.Verdict = v.Verdict;
        if (!s.Stepping)
        {
            ApplyVerdict(s);
            Schedule();
        }
    }

    private void ApplyVerdict(DeviceSession s)
    {
        try
        {
            s.ApplyVerdict();
            s.Flush(); // its tokens to its session now (its next tree is on its way from the drafter)
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            Finish(s, DeviceReplies.For(s.Request, ex));
        }
    }

    private void OnVerifyFailed(VerifierProtocol.VerifyFailed f)
    {
        if (_byId.TryGetValue(f.Run, out var s) && _queues.Decoding.Contains(s) && s.AwaitingStep == f.Step)
        {
            var ex = new DeviceReplies.VerifierFailedException($"the verifier could not verify step {f.Step}: {f.Reason}");
            if (s.Stepping)
            {
                s.StepFailure = ex; // the step's task still holds the session: finished when its step ends
                return;
            }

            Finish(s, DeviceReplies.For(s.Request, ex));
            Schedule();
        }
    }
}
