namespace CoordGen;

/// <summary>
/// Cuts streamed text at the first stop sequence. Text that might be the start of a stop sequence is held
/// back until it is known not to be, so a client never sees part of a stop sequence.
/// </summary>
public sealed class StopSequenceFilter(IReadOnlyList<string> stops)
{
    private string _held = "";

    public bool Stopped { get; private set; }

    /// <summary>Adds generated text; returns the text safe to emit now.</summary>
    public string Push(string delta)
    {
        if (Stopped)
        {
            return "";
        }

        string buf = _held + delta;
        int cut = -1;
        foreach (string s in stops)
        {
            int i = buf.IndexOf(s, StringComparison.Ordinal);
            if (i >= 0 && (cut < 0 || i < cut))
            {
                cut = i;
            }
        }

        if (cut >= 0)
        {
            Stopped = true;
            _held = "";
            return buf[..cut];
        }

        int keep = 0;
        foreach (string s in stops)
        {
            for (int k = Math.Min(s.Length - 1, buf.Length); k > keep; k--)
            {
                if (buf.AsSpan(buf.Length - k).SequenceEqual(s.AsSpan(0, k)))
                {
                    keep = k;
                    break;
                }
            }
        }

        _held = buf[(buf.Length - keep)..];
        return buf[..(buf.Length - keep)];
    }

    /// <summary>The end of generation: whatever was held back is plain text after all.</summary>
    public string Flush()
    {
        string rest = Stopped ? "" : _held;
        _held = "";
        return rest;
    }
}
