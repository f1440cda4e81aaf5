using System.Collections.Frozen;

namespace ActorVmm.LibVmm;

/// <summary>A CPUID feature flag a CPU model can add or remove: leaf, subleaf (null: leaf has none), register, bit.</summary>
public sealed record CpuFeature(string Name, uint Leaf, uint? Subleaf, CpuidPolicy.Reg Register, int Bit)
{
    public uint Mask => 1u << Bit;
}

/// <summary>
/// Which CPUID features a VM's vcpus see, written as QEMU's <c>-cpu</c> option is:
/// <c>host[,+feature|-feature|feature=on|feature=off]...</c>. The base model <c>host</c> is what this
/// host's KVM supports (KVM_GET_SUPPORTED_CPUID) less the platform's defaults
/// (<see cref="CpuidPolicy.PlatformDefaults"/>); <c>-f</c> hides feature f, <c>+f</c> shows it,
/// also one the platform hides by default, if KVM can provide it. Later items win. Feature names
/// are Linux's and QEMU's (<c>x2apic</c>, <c>tsc-deadline</c>, <c>sse4.1</c> = <c>sse4_1</c>);
/// bits as in the Intel SDM Vol 2A, CPUID, Tables 3-8 to 3-11, and the AMD APM Vol 3 for leaf 0x80000001.
/// </summary>
public sealed record CpuModel
{
    public const string HostBase = "host";

    /// <summary>The default: <c>host</c>, nothing added or removed.</summary>
    public static CpuModel Host { get; } = new([], []);

    private CpuModel(IReadOnlyList<CpuFeature> added, IReadOnlyList<CpuFeature> removed)
    {
        Added = added;
        Removed = removed;
    }

    /// <summary>Features shown on top of the base (each one KVM must support).</summary>
    public IReadOnlyList<CpuFeature> Added { get; }

    /// <summary>Features hidden from the guest.</summary>
    public IReadOnlyList<CpuFeature> Removed { get; }

    /// <summary>The model as it would be written: <c>host,+a,-b</c>.</summary>
    public override string ToString() =>
        string.Join(',', [HostBase, .. Added.Select(f => "+" + f.Name), .. Removed.Select(f => "-" + f.Name)]);

    /// <summary>The feature named <paramref name="name"/> (any spelling <see cref="Parse"/> takes).</summary>
    public static CpuFeature Feature(string name) =>
        Features.TryGetValue(Canonical(name), out var f) ? f : throw new ArgumentException($"unknown CPU feature \"{name}\"", nameof(name));

    /// <summary>Whether the model hides <paramref name="feature"/>.</summary>
    public bool Hides(string feature) => Removed.Any(f => f.Name == Canonical(feature));

    /// <summary>Parses a model; throws <see cref="FormatException"/> naming what is wrong.</summary>
    public static CpuModel Parse(string spec)
    {
        var items = (spec ?? "").Split(',', StringSplitOptions.TrimEntries);
        if (items[0].Length == 0) throw new FormatException("a CPU model starts with its base model: host");
        if (!items[0].Equals(HostBase, StringComparison.OrdinalIgnoreCase))
            throw new FormatException($"unknown base CPU model \"{items[0]}\" (known: {HostBase})");
        var wanted = new Dictionary<CpuFeature, bool>();
        foreach (var item in items.Skip(1))
        {
            if (item.Length == 0) throw new FormatException($"CPU model \"{spec}\": an empty item");
            var (name, on) = item[0] switch
            {
                '+' => (item[1..], true),
                '-' => (item[1..], false),
                _ when item.EndsWith("=on", StringComparison.OrdinalIgnoreCase) => (item[..^3], true),
                _ when item.EndsWith("=off", StringComparison.OrdinalIgnoreCase) => (item[..^4], false),
                _ => throw new FormatException($"CPU model item \"{item}\": write +feature, -feature, feature=on or feature=off"),
            };
            if (!Features.TryGetValue(Canonical(name), out var feature))
            {
                if (NotModelled.TryGetValue(Canonical(name), out var why)) throw new FormatException($"CPU feature \"{name}\" {why}");
                throw new FormatException($"unknown CPU feature \"{name}\" (known: {string.Join(' ', Known.Select(f => f.Name))})");
            }
            wanted.Remove(feature); // later items win, in their place
            wanted[feature] = on;
        }
        return wanted.Count == 0 ? Host
            : new CpuModel([.. wanted.Where(w => w.Value).Select(w => w.Key)], [.. wanted.Where(w => !w.Value).Select(w => w.Key)]);
    }

    public bool Equals(CpuModel? other) =>
        other is not null && Added.SequenceEqual(other.Added) && Removed.SequenceEqual(other.Removed);

    public override int GetHashCode() => ToString().GetHashCode(StringComparison.Ordinal);

    /// <summary>Lower case, with <c>_</c> and <c>.</c> written as <c>-</c>, aliases resolved.</summary>
    private static string Canonical(string name)
    {
        var n = name.Trim().ToLowerInvariant().Replace('_', '-').Replace('.', '-');
        return Aliases.TryGetValue(n, out var canonical) ? canonical : n;
    }

    private static readonly FrozenDictionary<string, string> Aliases = new Dictionary<string, string>
    {
        ["pni"] = "sse3",
        ["tsc-deadline-timer"] = "tsc-deadline",
        ["lahf-lm"] = "lahf",
        ["sha"] = "sha-ni",
        ["i64"] = "lm",
        ["xd"] = "nx",
        ["1gb"] = "pdpe1gb",
    }.ToFrozenDictionary();

    /// <summary>Names that are CPUID bits but not the model's to set, with the reason.</summary>
    private static readonly FrozenDictionary<string, string> NotModelled = new Dictionary<string, string>
    {
        ["apic"] = "follows IA32_APIC_BASE.EN at run time (SDM Vol 3A §10.4.3): a guest disables its APIC itself",
        ["osxsave"] = "follows the guest's CR4.OSXSAVE at run time",
        ["hypervisor"] = "is always set: the guest runs under a hypervisor",
    }.ToFrozenDictionary();

    private static CpuFeature L1Ecx(string name, int bit) => new(name, 1, null, CpuidPolicy.Reg.Ecx, bit);
    private static CpuFeature L1Edx(string name, int bit) => new(name, 1, null, CpuidPolicy.Reg.Edx, bit);
    private static CpuFeature L7Ebx(string name, int bit) => new(name, 7, 0, CpuidPolicy.Reg.Ebx, bit);
    private static CpuFeature L7Ecx(string name, int bit) => new(name, 7, 0, CpuidPolicy.Reg.Ecx, bit);
    private static CpuFeature L7Edx(string name, int bit) => new(name, 7, 0, CpuidPolicy.Reg.Edx, bit);
    private static CpuFeature ExtEcx(string name, int bit) => new(name, 0x8000_0001, null, CpuidPolicy.Reg.Ecx, bit);
    private static CpuFeature ExtEdx(string name, int bit) => new(name, 0x8000_0001, null, CpuidPolicy.Reg.Edx, bit);

    /// <summary>Every feature a model can name.</summary>
    public static IReadOnlyList<CpuFeature> Known { get; } =
    [
        L1Edx("fpu", 0), L1Edx("vme", 1), L1Edx("de", 2), L1Edx("pse", 3), L1Edx("tsc", 4), L1Edx("msr", 5),
        L1Edx("pae", 6), L1Edx("mce", 7), L1Edx("cx8", 8), L1Edx("sep", 11), L1Edx("mtrr", 12), L1Edx("pge", 13),
        L1Edx("mca", 14), L1Edx("cmov", 15), L1Edx("pat", 16), L1Edx("pse36", 17), L1Edx("clflush", 19),
        L1Edx("mmx", 23), L1Edx("fxsr", 24), L1Edx("sse", 25), L1Edx("sse2", 26), L1Edx("ss", 27), L1Edx("ht", 28),
        L1Ecx("sse3", 0), L1Ecx("pclmulqdq", 1), L1Ecx("monitor", 3), L1Ecx("vmx", 5), L1Ecx("ssse3", 9),
        L1Ecx("fma", 12), L1Ecx("cx16", 13), L1Ecx("pdcm", 15), L1Ecx("pcid", 17), L1Ecx("sse4-1", 19),
        L1Ecx("sse4-2", 20), L1Ecx("x2apic", 21), L1Ecx("movbe", 22), L1Ecx("popcnt", 23), L1Ecx("tsc-deadline", 24),
        L1Ecx("aes", 25), L1Ecx("xsave", 26), L1Ecx("avx", 28), L1Ecx("f16c", 29), L1Ecx("rdrand", 30),
        L7Ebx("fsgsbase", 0), L7Ebx("tsc-adjust", 1), L7Ebx("bmi1", 3), L7Ebx("hle", 4), L7Ebx("avx2", 5),
        L7Ebx("smep", 7), L7Ebx("bmi2", 8), L7Ebx("erms", 9), L7Ebx("invpcid", 10), L7Ebx("rtm", 11),
        L7Ebx("avx512f", 16), L7Ebx("avx512dq", 17), L7Ebx("rdseed", 18), L7Ebx("adx", 19), L7Ebx("smap", 20),
        L7Ebx("clflushopt", 23), L7Ebx("clwb", 24), L7Ebx("sha-ni", 29), L7Ebx("avx512bw", 30), L7Ebx("avx512vl", 31),
        L7Ecx("avx512vbmi", 1), L7Ecx("umip", 2), L7Ecx("pku", 3), L7Ecx("waitpkg", 5), L7Ecx("gfni", 8),
        L7Ecx("vaes", 9), L7Ecx("vpclmulqdq", 10), L7Ecx("la57", 16), L7Ecx("rdpid", 22),
        L7Edx("fsrm", 4), L7Edx("md-clear", 10), L7Edx("spec-ctrl", 26), L7Edx("stibp", 27),
        L7Edx("arch-capabilities", 29), L7Edx("ssbd", 31),
        ExtEcx("lahf", 0), ExtEcx("svm", 2), ExtEcx("abm", 5), ExtEcx("sse4a", 6), ExtEcx("3dnowprefetch", 8),
        ExtEcx("topoext", 22),
        ExtEdx("syscall", 11), ExtEdx("nx", 20), ExtEdx("pdpe1gb", 26), ExtEdx("rdtscp", 27), ExtEdx("lm", 29),
    ];

    private static readonly FrozenDictionary<string, CpuFeature> Features = Known.ToFrozenDictionary(f => f.Name);
}
