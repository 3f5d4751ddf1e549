/* OHIF viewer configuration for this archive: one DICOMweb data source at the archive's /v2 root.
 * tests/test_ohif.py serves it in place of the app-config.js shipped with @ohif/app, with
 * __DICOMWEB_ROOT__ replaced by the archive's URL (e.g. http://127.0.0.1:8080/v2). */
window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'dicomweb',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'DICOMweb archive',
        name: 'dicomweb-archive',
        wadoUriRoot: '__DICOMWEB_ROOT__',
        qidoRoot: '__DICOMWEB_ROOT__',
        wadoRoot: '__DICOMWEB_ROOT__',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
