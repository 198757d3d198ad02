using CoordGen.Host;

return await Cli.RunAsync(args);
