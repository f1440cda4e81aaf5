using ActorVmm.LibVmm;
using Xunit;

namespace ActorVmm.Testing;

// Shared by every test project that runs real guests: link it with
// <Compile Include="../LibVmm.Tests/KvmFactAttribute.cs" /> (the project must reference LibVmm).

/// <summary>
/// Whether this process may run KVM tests. KVM tests fail (never skip) when
/// <c>ACTORVMM_REQUIRE_KVM=1</c> (set in CI) and KVM is unusable; elsewhere they skip with the
/// reason (../shared/DESIGN.md §5).
/// </summary>
public static class KvmRequirement
{
    public const string RequireVariable = "ACTORVMM_REQUIRE_KVM";

    private static readonly Lazy<string?> Reason = new(() => Kvm.Unavailability());

    /// <summary>Why KVM cannot be used here, or null if it can. Probed once per process.</summary>
    public static string? Unavailability => Reason.Value;

    /// <summary>Whether a missing KVM must fail the KVM tests instead of skipping them.</summary>
    public static bool Required => Environment.GetEnvironmentVariable(RequireVariable) == "1";

    /// <summary>
    /// The reason a <see cref="KvmFactAttribute"/> test is skipped, or null when it must run
    /// (KVM usable, or required by the environment so that the test fails inside).
    /// </summary>
    public static string? SkipReason =>
        Unavailability is { } reason && !Required
            ? $"KVM unavailable: {reason} (set {RequireVariable}=1 to make this a failure)"
            : null;

    /// <summary>
    /// Call first in a KVM test. Returns when KVM is usable; otherwise throws with the reason.
    /// (xunit 2 cannot skip from inside a test: the skip comes from <see cref="KvmFactAttribute"/>,
    /// so reaching the throw means KVM is required, or the test lacks <c>[KvmFact]</c>.)
    /// </summary>
    public static void Check()
    {
        if (Unavailability is not { } reason) return;
        throw Required
            ? new InvalidOperationException($"{RequireVariable}=1 but KVM is unavailable: {reason}")
            : new InvalidOperationException($"KVM is unavailable: {reason} (mark this test [KvmFact] so it skips)");
    }
}

/// <summary>A fact that needs a usable /dev/kvm: skipped with the reason when KVM is missing,
/// unless <c>ACTORVMM_REQUIRE_KVM=1</c>, in which case it runs and fails with the reason.</summary>
[AttributeUsage(AttributeTargets.Method, AllowMultiple = false)]
public sealed class KvmFactAttribute : FactAttribute
{
    public KvmFactAttribute()
    {
        if (KvmRequirement.SkipReason is { } reason) Skip = reason;
    }
}

/// <summary>A theory that needs a usable /dev/kvm, with the same skip/require rules as <see cref="KvmFactAttribute"/>.</summary>
[AttributeUsage(AttributeTargets.Method, AllowMultiple = false)]
public sealed class KvmTheoryAttribute : TheoryAttribute
{
    public KvmTheoryAttribute()
    {
        if (KvmRequirement.SkipReason is { } reason) Skip = reason;
    }
}

/// <summary>
/// Where the KVM tests run inside CI's KVM box (.ci/kvmbox: kvm_amd nested in QEMU's software
/// emulation of SVM), which .ci/run announces with <c>ACTORVMM_KVM_BOX=1</c>. A few guests hit
/// limits of that emulation rather than of ActorVmm; their tests name the limit and skip there
/// (they run everywhere else, on any real KVM).
/// </summary>
public static class KvmBox
{
    public const string Variable = "ACTORVMM_KVM_BOX";

    public static bool Inside => Environment.GetEnvironmentVariable(Variable) == "1";
}

/// <summary>One row of a KVM theory, skipped with <see cref="NotInKvmBox"/> as the reason inside
/// CI's KVM box (see <see cref="KvmBox"/>) when that is given.</summary>
[AttributeUsage(AttributeTargets.Method, AllowMultiple = true)]
public sealed class KvmDataAttribute(params object[] values) : Xunit.Sdk.DataAttribute
{
    /// <summary>Why this row cannot run in CI's KVM box (it skips there, saying so).</summary>
    public string? NotInKvmBox
    {
        get;
        set
        {
            field = value;
            if (value is not null && KvmBox.Inside) Skip = $"not in CI's KVM box: {value}";
        }
    }

    public override IEnumerable<object[]> GetData(System.Reflection.MethodInfo testMethod) => [values];
}
