using CoordGen.Messages;

namespace CoordGen.Actors.Device;

/// <summary>
/// The width budget across sessions (decision 0028): when several speculative sessions' trees are ready, which of them
/// share one packed run and at what width. Packed graphs are static, [slots x width] rows, so the rows a pack spends are
/// its slot count times its width whatever the trees hold; the budget is the choice of width (and, where a smaller graph
/// must do, of members) that expects the most tokens per millisecond of the run. Each session's expected tokens at a
/// width are its root's token plus its tree's first nodes' estimated chances of acceptance (per source and depth, from
/// recent steps: <c>NodeAcceptance</c>). Pure, table-tested; the device logs each decision with its snapshot for replay.
/// </summary>
public static class WidthBudget
{
    /// <summary>
    /// The pack to run from <paramref name="snapshot"/>. At each width, the first option that pays or is due to be learned
    /// (as many sessions as the width holds, a smaller graph only where the larger does not pay), its members the pick and
    /// the others that expect the most at that width. A pack to learn first (the widest); else, of the widths, the one
    /// whose pack takes the most sessions (a session left out needs a run of its own), and of those the one whose members
    /// expect the most tokens per millisecond (the wider on a tie); <see cref="WidthBudgetChoice.None"/> when none pays.
    /// </summary>
    public static WidthBudgetChoice Choose(WidthBudgetSnapshot snapshot)
    {
        ArgumentNullException.ThrowIfNull(snapshot);
        WidthBudgetChoice? best = null;
        double bestRate = double.NegativeInfinity;
        foreach (int width in snapshot.Widths)
        {
            if (First(snapshot, o => o.Width == width, ranked: true) is not var (choice, o))
            {
                continue;
            }

            if (o.Learn || o.Ms is not { } ms)
            {
                return choice;
            }

            double rate = choice.ExpectedTokens / Math.Max(1e-6, ms);
            if (best is null || choice.Members.Length > best.Members.Length || (choice.Members.Length == best.Members.Length && rate > bestRate))
            {
                (best, bestRate) = (choice, rate);
            }
        }

        return best ?? WidthBudgetChoice.None;
    }

    /// <summary>
    /// The rule before the budget, kept to compare against it: the first option that pays or is due to be learned, in the
    /// snapshot's order (the widest width, the most sessions), its members the pick and the others in the snapshot's order.
    /// </summary>
    public static WidthBudgetChoice Widest(WidthBudgetSnapshot snapshot)
    {
        ArgumentNullException.ThrowIfNull(snapshot);
        return First(snapshot, _ => true, ranked: false)?.Choice ?? WidthBudgetChoice.None;
    }

    /// <summary>
    /// How a pack of <paramref name="sessions"/> trees of <paramref name="width"/> rows stands, from the runtime's measured
    /// times: <paramref name="soloMs"/> a solo run of that width, <paramref name="ratio"/> a packed run of its slot count over
    /// a solo run, <paramref name="packedMs"/> a packed run in this bucket (null: none measured). It pays by
    /// <see cref="StepPolicy.PackPays"/> once its ratio is known, is to be learned while it is not, and is refused (a
    /// candidate for <see cref="WithProbes"/>) when it is known not to pay. A graph not compiled yet, or steps too short to
    /// pack, rule it out. <paramref name="always"/> (<see cref="PackingMode.Always"/>): every pack is one to learn, so the
    /// first runs.
    /// </summary>
    public static BudgetOption Option(int width, int sessions, double? soloMs, double? ratio, double? packedMs, bool ready, bool always = false)
    {
        double? ms = packedMs ?? (soloMs * ratio);
        if (always)
        {
            return new(width, sessions, ms, Pays: true, Learn: true);
        }

        bool possible = ready && StepPolicy.PackPays(null, sessions, soloMs);
        bool pays = possible && ratio is not null && StepPolicy.PackPays(ratio, sessions, soloMs);
        return new(width, sessions, ms, pays, Learn: possible && ratio is null, Refused: possible && ratio is not null && !pays);
    }

    /// <summary>
    /// The snapshot with refused packs due to be measured again made packs to learn: only those before the first that pays
    /// or is to be learned, in the snapshot's order, are asked (<paramref name="probe"/> counts a refusal each time it is
    /// asked, and says yes now and then), as the rule before the budget asked them; a refused pack that is never a candidate
    /// would otherwise be asked at every step and run far more often.
    /// </summary>
    public static WidthBudgetSnapshot WithProbes(WidthBudgetSnapshot snapshot, Func<BudgetOption, bool> probe)
    {
        ArgumentNullException.ThrowIfNull(snapshot);
        ArgumentNullException.ThrowIfNull(probe);
        var options = snapshot.Options.ToBuilder();
        for (int i = 0; i < options.Count && !options[i].Pays && !options[i].Learn; i++)
        {
            if (options[i].Refused && probe(options[i]))
            {
                options[i] = options[i] with { Learn = true };
                break;
            }
        }

        return snapshot with { Options = options.ToImmutable() };
    }

    // The first option in the snapshot's order that pays or is due to be learned, among those <paramref name="where"/> takes, with its members.
    private static (WidthBudgetChoice Choice, BudgetOption Option)? First(WidthBudgetSnapshot snapshot, Func<BudgetOption, bool> where, bool ranked)
    {
        foreach (var o in snapshot.Options)
        {
            int at = snapshot.Widths.IndexOf(o.Width);
            if ((o.Pays || o.Learn) && at >= 0 && where(o) && Members(snapshot, at, o.Sessions, ranked) is { } members)
            {
                return (new WidthBudgetChoice(o.Width, [.. members.Select(m => m.Session)], members.Sum(m => m.Expected[at]), o.Ms), o);
            }
        }

        return null;
    }

    /// <summary>
    /// The members of a pack of <paramref name="count"/> trees at the snapshot's width number <paramref name="widthIndex"/>:
    /// the device's pick (it is the stream whose turn it is) and, <paramref name="ranked"/>, the others that expect the most
    /// tokens at that width (the snapshot's order on a tie), else the others in the snapshot's order; sessions without room
    /// for the width are left out. Null when the pick has no room or too few others do.
    /// </summary>
    public static List<BudgetSession>? Members(WidthBudgetSnapshot snapshot, int widthIndex, int count, bool ranked = true)
    {
        ArgumentNullException.ThrowIfNull(snapshot);
        if (snapshot.Sessions.Length == 0 || snapshot.Sessions[0].Expected[widthIndex] <= 0 || count < 1)
        {
            return null;
        }

        var fit = snapshot.Sessions.Skip(1).Select((s, i) => (s, i)).Where(t => t.s.Expected[widthIndex] > 0);
        var others = (ranked ? fit.OrderByDescending(t => t.s.Expected[widthIndex]).ThenBy(t => t.i) : fit).Take(count - 1).Select(t => t.s).ToList();
        return others.Count == count - 1 ? [snapshot.Sessions[0], .. others] : null;
    }
}
