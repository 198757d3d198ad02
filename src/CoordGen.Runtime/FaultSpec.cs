using System.Globalization;
using CoordGen.Engine.Runtime;

namespace CoordGen;

/// <summary>
/// Fault injection for apps that test how they cope with a failing runtime: a seeded schedule of faults
/// (<see cref="FaultPlan"/>) written as <c>key=value</c> pairs separated by <c>;</c>, for example
/// <c>kinds=DeviceException,NonFiniteLogits,SessionKill;gap=8;seed=7;budget=100</c>. Keys: <c>kinds</c>
/// (comma-separated <see cref="FaultKind"/> names, or <c>all</c>; default every kind but DeviceActorCrash),
/// <c>gap</c> (mean device steps between faults, default 8), <c>seed</c> (default 1), <c>budget</c> (faults
/// in all, default unlimited), <c>hang_ms</c> (how long an injected hang stalls, default 20). <c>on</c> alone
/// means every default. Requests resume after each fault, so their output must not change.
/// </summary>
public sealed record FaultSpec(IReadOnlyList<FaultKind> Kinds, int MeanGap, int Seed, int Budget, int HangMs)
{
    /// <summary>The kinds <c>kinds</c> defaults to: all but DeviceActorCrash, which restarts the device actor.</summary>
    public static readonly IReadOnlyList<FaultKind> DefaultKinds = [.. Enum.GetValues<FaultKind>().Where(k => k != FaultKind.DeviceActorCrash)];

    /// <summary>Reads a spec; a mistake throws <see cref="ArgumentException"/> saying what to write instead.</summary>
    public static FaultSpec Parse(string spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        var kinds = DefaultKinds;
        int gap = 8, seed = 1, budget = int.MaxValue, hang = 20;
        foreach (string part in spec.Split(';', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            if (part == "on")
            {
                continue;
            }

            int eq = part.IndexOf('=', StringComparison.Ordinal);
            string key = eq < 0 ? part : part[..eq].Trim();
            string value = eq < 0 ? "" : part[(eq + 1)..].Trim();
            switch (key)
            {
                case "kinds":
                    kinds = value == "all" ? Enum.GetValues<FaultKind>() : [.. value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(Kind)];
                    if (kinds.Count == 0)
                    {
                        throw new ArgumentException($"fault spec: 'kinds' is empty; name some of {string.Join(", ", Enum.GetNames<FaultKind>())}.");
                    }

                    break;
                case "gap":
                    gap = Int(key, value, 1);
                    break;
                case "seed":
                    seed = Int(key, value, 0);
                    break;
                case "budget":
                    budget = Int(key, value, 1);
                    break;
                case "hang_ms":
                    hang = Int(key, value, 1);
                    break;
                default:
                    throw new ArgumentException($"fault spec: unknown key '{key}'; use kinds, gap, seed, budget and hang_ms, as in 'kinds=DeviceException,SessionKill;gap=8;seed=7'.");
            }
        }

        return new FaultSpec(kinds, gap, seed, budget, hang);
    }

    /// <summary>A fresh plan for this spec.</summary>
    public FaultPlan NewPlan() => new(Seed, Budget, MeanGap, Kinds, TimeSpan.FromMilliseconds(HangMs));

    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"kinds={string.Join(',', Kinds)};gap={MeanGap};seed={Seed}{(Budget == int.MaxValue ? "" : $";budget={Budget}")};hang_ms={HangMs}");

    private static FaultKind Kind(string name) => Enum.TryParse<FaultKind>(name, ignoreCase: true, out var k) && Enum.IsDefined(k)
        ? k
        : throw new ArgumentException($"fault spec: unknown fault kind '{name}'; the kinds are {string.Join(", ", Enum.GetNames<FaultKind>())}.");

    private static int Int(string key, string value, int min) => int.TryParse(value, NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) && v >= min
        ? v
        : throw new ArgumentException($"fault spec: '{key}' must be an integer of at least {min} (got '{value}').");
}
