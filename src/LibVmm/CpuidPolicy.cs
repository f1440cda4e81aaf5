namespace ActorVmm.LibVmm;

/// <summary>
/// The CPUID a VM's vcpus see: KVM_GET_SUPPORTED_CPUID minus the features this platform cannot
/// run, plus per-vcpu topology (APIC ids). Immutable; build one per VM.
/// </summary>
public sealed class CpuidPolicy
{
    public enum Reg { Eax, Ebx, Ecx, Edx }

    /// <summary>A feature bit to hide: leaf, subleaf (null = every subleaf), register, mask.</summary>
    public sealed record Clear(uint Leaf, uint? Subleaf, Reg Register, uint Mask, string Name);

    // Leaf 1 ECX.
    public const uint Leaf1EcxFma = 1u << 12;
    public const uint Leaf1EcxCx16 = 1u << 13;
    public const uint Leaf1EcxX2Apic = 1u << 21;
    public const uint Leaf1EcxTscDeadline = 1u << 24;
    public const uint Leaf1EcxXsave = 1u << 26;
    public const uint Leaf1EcxOsxsave = 1u << 27;
    public const uint Leaf1EcxAvx = 1u << 28;
    public const uint Leaf1EcxF16c = 1u << 29;
    public const uint Leaf1EcxHypervisor = 1u << 31;

    // Leaf 7 subleaf 0.
    public const uint Leaf7EbxAvx2 = 1u << 5;
    public const uint Leaf7EbxAvx512Mask = 0b1101_1100_0010_0011_0000_0000_0000_0000; // F, DQ, IFMA, PF, ER, CD, BW, VL
    public const uint Leaf7EcxAvx512Mask = 0b0000_0000_0000_0000_0101_1000_0100_0010; // VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
    public const uint Leaf7EdxAvx512Mask = 0b0000_0000_0000_0000_0000_0001_0000_1100; // 4VNNIW, 4FMAPS, VP2INTERSECT

    /// <summary>What this machine's KVM cannot emulate (../shared/DESIGN.md §4): lock cmpxchg16b
    /// and xsave/xrstor, and the AVX family that needs XSAVE to be enabled by a guest.</summary>
    public static readonly IReadOnlyList<Clear> PlatformDefaults =
    [
        new(1, null, Reg.Ecx, Leaf1EcxCx16, "CX16"),
        new(1, null, Reg.Ecx, Leaf1EcxXsave | Leaf1EcxOsxsave, "XSAVE"),
        new(1, null, Reg.Ecx, Leaf1EcxAvx | Leaf1EcxFma | Leaf1EcxF16c, "AVX"),
        new(7, 0, Reg.Ebx, Leaf7EbxAvx2 | Leaf7EbxAvx512Mask, "AVX2/AVX-512"),
        new(7, 0, Reg.Ecx, Leaf7EcxAvx512Mask, "AVX-512"),
        new(7, 0, Reg.Edx, Leaf7EdxAvx512Mask, "AVX-512"),
        new(7, 1, Reg.Eax, 0b0011_0000, "AVX-VNNI/AVX512-BF16"),
    ];

    /// <summary>KVM's paravirtual feature leaf (Documentation/virt/kvm/x86/cpuid.rst): KVM_CPUID_FEATURES.</summary>
    public const uint KvmFeaturesLeaf = 0x4000_0001;
    public const uint KvmFeatureAsyncPf = 1u << 4, KvmFeaturePvEoi = 1u << 6, KvmFeaturePvUnhalt = 1u << 7,
        KvmFeatureAsyncPfVmexit = 1u << 10, KvmFeaturePvSendIpi = 1u << 11, KvmFeatureAsyncPfInt = 1u << 14;

    /// <summary>
    /// KVM's paravirtual features that work only with KVM's in-kernel local APIC: KVM refuses the
    /// MSRs that enable asynchronous page faults (MSR_KVM_ASYNC_PF_EN, _INT) and PV EOI
    /// (MSR_KVM_PV_EOI_EN) without one, and its PV IPI hypercall delivers through it. So does the
    /// kick of paravirtual spinlocks (PV_UNHALT: a waiter sleeps in HLT with interrupts disabled
    /// until another vcpu's KVM_HC_KICK_CPU, which KVM delivers through its local APIC; hypercalls.rst).
    /// With local APICs in user space a guest shown them gets #GP on those MSRs (Linux: "unchecked
    /// MSR access error: WRMSR to 0x4b564d06"), IPIs that go nowhere, or a spinlock waiter nothing
    /// wakes; hidden, it uses the APIC as hardware and spins on its locks.
    /// </summary>
    public static readonly IReadOnlyList<Clear> NeedsKernelLapic =
    [
        new(KvmFeaturesLeaf, null, Reg.Eax,
            KvmFeatureAsyncPf | KvmFeaturePvEoi | KvmFeaturePvUnhalt | KvmFeatureAsyncPfVmexit | KvmFeaturePvSendIpi | KvmFeatureAsyncPfInt,
            "KVM async PF, PV EOI, PV unhalt, PV send-IPI"),
    ];

    /// <summary>
    /// Hidden under either local APIC: paravirtual spinlocks (PV_UNHALT). Their waiter sleeps in HLT
    /// with interrupts disabled until another vcpu's KVM_HC_KICK_CPU; a VM whose started vcpus all
    /// sleep so has ended (exit code 0), and whether a vcpu KVM runs is still running or waits for
    /// a kick cannot be told apart from outside. Without the bit, Linux spins on a contended lock.
    /// </summary>
    public static readonly IReadOnlyList<Clear> SleepsWithInterruptsDisabled =
    [
        new(KvmFeaturesLeaf, null, Reg.Eax, KvmFeaturePvUnhalt, "KVM PV unhalt"),
    ];

    /// <summary>What the platform hides from a VM besides <see cref="PlatformDefaults"/>: with local
    /// APICs in user space (<paramref name="kernelLapic"/> false), <see cref="NeedsKernelLapic"/>; always,
    /// <see cref="SleepsWithInterruptsDisabled"/>.</summary>
    public static IReadOnlyList<Clear> Hidden(bool kernelLapic) =>
        kernelLapic ? SleepsWithInterruptsDisabled : [.. NeedsKernelLapic, .. SleepsWithInterruptsDisabled];

    private readonly KvmCpuidEntry2[] _base;

    public IReadOnlyList<Clear> Cleared { get; }

    public CpuidPolicy(IEnumerable<KvmCpuidEntry2> supported, IEnumerable<Clear> clears)
    {
        Cleared = clears.ToArray();
        // Leaf 0xD enumerates XSAVE state components: gone with XSAVE.
        var hideXsaveLeaf = Cleared.Any(c => c.Leaf == 1 && (c.Mask & Leaf1EcxXsave) != 0);
        var entries = supported.Where(e => !(hideXsaveLeaf && e.Function == 0xD)).ToArray();
        for (var i = 0; i < entries.Length; i++)
        {
            foreach (var c in Cleared)
            {
                if (entries[i].Function != c.Leaf) continue;
                if (c.Subleaf is { } sub && entries[i].Index != sub) continue;
                switch (c.Register)
                {
                    case Reg.Eax: entries[i].Eax &= ~c.Mask; break;
                    case Reg.Ebx: entries[i].Ebx &= ~c.Mask; break;
                    case Reg.Ecx: entries[i].Ecx &= ~c.Mask; break;
                    case Reg.Edx: entries[i].Edx &= ~c.Mask; break;
                }
            }
        }
        _base = entries;
    }

    public static CpuidPolicy ForPlatform(IEnumerable<KvmCpuidEntry2> supported) => new(supported, PlatformDefaults);

    /// <summary>
    /// The policy of CPU model <paramref name="model"/>: the platform's defaults, less what the model
    /// adds back, plus what it removes. <paramref name="provided"/> are features the VMM provides
    /// itself whatever KVM_GET_SUPPORTED_CPUID says (the TSC-deadline timer of a user-space local
    /// APIC, or of KVM's when KVM_CAP_TSC_DEADLINE_TIMER says so, which that ioctl never reports);
    /// they are shown unless the model removes them. Throws <see cref="ArgumentException"/> naming a
    /// feature the model adds that neither KVM nor the VMM provides. <paramref name="hidden"/> are
    /// further clears the VM's configuration needs (e.g. <see cref="NeedsKernelLapic"/>).
    /// </summary>
    public static CpuidPolicy ForModel(IEnumerable<KvmCpuidEntry2> supported, CpuModel model, IEnumerable<CpuFeature>? provided = null,
        IEnumerable<Clear>? hidden = null)
    {
        var entries = supported.ToArray();
        foreach (var f in provided ?? [])
            for (var i = 0; i < entries.Length; i++)
            {
                if (entries[i].Function != f.Leaf || f.Subleaf is { } sub && entries[i].Index != sub) continue;
                switch (f.Register)
                {
                    case Reg.Eax: entries[i].Eax |= f.Mask; break;
                    case Reg.Ebx: entries[i].Ebx |= f.Mask; break;
                    case Reg.Ecx: entries[i].Ecx |= f.Mask; break;
                    case Reg.Edx: entries[i].Edx |= f.Mask; break;
                }
            }
        var missing = model.Added.Where(f => !Has(entries, f)).Select(f => f.Name).ToArray();
        if (missing.Length > 0)
            throw new ArgumentException($"CPU model {model}: KVM on this host cannot provide {string.Join(", ", missing)}");
        uint AddedBack(Clear c) => model.Added
            .Where(f => f.Leaf == c.Leaf && f.Register == c.Register && (c.Subleaf is null || f.Subleaf == c.Subleaf))
            .Aggregate(0u, (mask, f) => mask | f.Mask);
        var clears = PlatformDefaults.Select(c => c with { Mask = c.Mask & ~AddedBack(c) }).Where(c => c.Mask != 0)
            .Concat(model.Removed.Select(f => new Clear(f.Leaf, f.Subleaf, f.Register, f.Mask, f.Name)))
            .Concat(hidden ?? []);
        return new CpuidPolicy(entries, clears);
    }

    /// <summary>Whether the vcpus see <paramref name="feature"/> (before per-vcpu topology).</summary>
    public bool Has(CpuFeature feature) => Has(_base, feature);

    private static bool Has(IEnumerable<KvmCpuidEntry2> entries, CpuFeature feature) => entries.Any(e =>
        e.Function == feature.Leaf && (feature.Subleaf is not { } sub || e.Index == sub) &&
        (feature.Register switch
        {
            Reg.Eax => e.Eax,
            Reg.Ebx => e.Ebx,
            Reg.Ecx => e.Ecx,
            _ => e.Edx,
        } & feature.Mask) != 0);

    /// <summary>The entries for one vcpu: its initial APIC id in leaf 1 EBX[31:24] and leaf 0xB EDX,
    /// the hypervisor bit set.</summary>
    public KvmCpuidEntry2[] EntriesFor(int vcpuId)
    {
        var entries = (KvmCpuidEntry2[])_base.Clone();
        for (var i = 0; i < entries.Length; i++)
        {
            switch (entries[i].Function)
            {
                case 1:
                    entries[i].Ebx = (entries[i].Ebx & 0x00FF_FFFF) | ((uint)vcpuId << 24);
                    entries[i].Ecx |= Leaf1EcxHypervisor;
                    break;
                case 0xB:
                case 0x1F:
                    entries[i].Edx = (uint)vcpuId;
                    break;
            }
        }
        return entries;
    }

    /// <summary>Looks up an entry (for tests and for `ctl`).</summary>
    public KvmCpuidEntry2? Find(uint leaf, uint subleaf = 0, int vcpuId = 0)
    {
        foreach (var e in EntriesFor(vcpuId))
            if (e.Function == leaf && ((e.Flags & KvmCpuidEntry2.SignificantIndex) == 0 || e.Index == subleaf))
                return e;
        return null;
    }
}
