using Microsoft.Extensions.AI;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Options;

namespace CoordGen;

/// <summary>
/// <c>services.AddCoordGen(...)</c>: the runtime (<see cref="InferenceService"/>, one per container, started on
/// first use and stopped when the container is disposed) and an <see cref="IChatClient"/> over it.
/// </summary>
public static class CoordGenServiceCollectionExtensions
{
    /// <summary>Adds CoordGen with options set in code.</summary>
    public static IServiceCollection AddCoordGen(this IServiceCollection services, Action<CoordGenOptions>? configure = null)
    {
        ArgumentNullException.ThrowIfNull(services);
        var builder = services.AddOptions<CoordGenOptions>();
        if (configure is not null)
        {
            builder.Configure(configure);
        }

        return AddCore(services);
    }

    /// <summary>Adds CoordGen with options bound from a configuration section (for example <c>configuration.GetSection("CoordGen")</c>), then <paramref name="configure"/>.</summary>
    public static IServiceCollection AddCoordGen(this IServiceCollection services, IConfiguration configuration, Action<CoordGenOptions>? configure = null)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configuration);
        var builder = services.AddOptions<CoordGenOptions>().Bind(configuration);
        if (configure is not null)
        {
            builder.Configure(configure);
        }

        return AddCore(services);
    }

    private static IServiceCollection AddCore(IServiceCollection services)
    {
        // The same checks as `coordgen serve` runs on its settings, with the same messages.
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<CoordGenOptions>, OptionsProblems>());
        services.TryAddSingleton(sp => InferenceService.Start(sp.GetRequiredService<IOptions<CoordGenOptions>>().Value));
        services.TryAddSingleton<IChatClient>(sp => new CoordGenChatClient(sp.GetRequiredService<InferenceService>()));
        return services;
    }

    private sealed class OptionsProblems : IValidateOptions<CoordGenOptions>
    {
        public ValidateOptionsResult Validate(string? name, CoordGenOptions options)
        {
            var problems = options.Problems();
            return problems.Count == 0 ? ValidateOptionsResult.Success : ValidateOptionsResult.Fail(problems);
        }
    }
}
