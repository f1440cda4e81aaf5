using Akka.Configuration.Hocon;

namespace ActorVmm.Host.Config;

/// <summary>
/// Settings given as values (the command line's options) rather than as HOCON text: each becomes
/// a string value at its dotted path, so no option's value is ever parsed as configuration syntax.
/// Put the result in front of the file's configuration with <c>WithFallback</c>.
/// </summary>
public static class ConfigValues
{
    /// <summary>A configuration holding <paramref name="values"/>: each key a dotted path
    /// ("actorvmm.vm.memory"), each value a string; a later value for the same path wins.</summary>
    public static Akka.Configuration.Config From(IEnumerable<KeyValuePair<string, string>> values)
    {
        var top = new HoconObject();
        foreach (var (path, value) in values)
        {
            var keys = path.Split('.');
            var at = top;
            foreach (var key in keys[..^1])
            {
                var child = at.GetOrCreateKey(key);
                if (child.Values.Count == 0) child.AppendValue(new HoconObject());
                at = child.GetObject();
            }
            at.GetOrCreateKey(keys[^1]).NewValue(new HoconLiteral { Value = value });
        }
        var root = new HoconValue();
        root.AppendValue(top);
        return new Akka.Configuration.Config(new HoconRoot(root));
    }

    /// <summary>Every leaf setting of <paramref name="config"/> under <paramref name="path"/>, as dotted
    /// path and string value (lists and objects are walked; a list's values are not settings and are skipped).</summary>
    public static List<KeyValuePair<string, string>> Flatten(Akka.Configuration.Config config, string path)
    {
        var result = new List<KeyValuePair<string, string>>();
        void Walk(HoconValue value, string at)
        {
            if (value.IsObject())
                foreach (var (key, child) in value.GetObject().Items) Walk(child, $"{at}.{key}");
            else if (value.IsString()) result.Add(new(at, value.GetString()));
        }
        if (config.GetValue(path) is { } root) Walk(root, path);
        return result;
    }
}

/// <summary>A string map that equals another with the same pairs (settings records compare by value).</summary>
public sealed class SettingsMap : Dictionary<string, string>
{
    public SettingsMap() : base(StringComparer.Ordinal) { }

    public override bool Equals(object? obj) =>
        obj is IReadOnlyDictionary<string, string> other && other.Count == Count
        && this.All(p => other.TryGetValue(p.Key, out var v) && v == p.Value);

    public override int GetHashCode() => this.Aggregate(Count, (h, p) => h ^ HashCode.Combine(p.Key, p.Value));
}
